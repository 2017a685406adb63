"""GPEN face restoration engine: images and tensors in, images out.

It never touches hot folders or shares; weight files are the only paths it opens.
"""
