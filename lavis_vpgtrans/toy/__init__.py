"""The offline toy world: a zoo of tiny models and data sets in the real formats (zoo.py).

The production package never imports it. It plugs in through the entry points setup.py
declares: the "toy:" path scheme (zoo.resolve, for common/paths.py) and the toy_caption /
toy_vqa builders (builders.py, registered when a config names them).
"""
