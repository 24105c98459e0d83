from vlmlab.monitor.memory import Monitor

__all__ = ["Monitor"]
