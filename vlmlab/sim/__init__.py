"""The tiny world: a simulator that writes the real path's inputs, byte for byte in the real formats.

Nothing in vlmlab's core (data, models, train, synth, evaluate, monitor, infer) imports this
package (tests/test_layers.py checks it); it imports the core to speak its formats.
See docs/architecture.md.
"""
