"""The napari side of napari-cpgcn: reader, sample data, layer builders and dock widgets.

The only package that imports napari or Qt; everything it computes comes from the core modules.
"""
