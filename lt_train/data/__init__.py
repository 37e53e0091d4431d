"""Training and selection data: sources (files, hub, the embedded demo), formatting."""
from .demo import demo_examples
from .format import EncodedExample, encode_example
from .sources import Example, load_examples

__all__ = ["Example", "EncodedExample", "demo_examples", "encode_example", "load_examples"]
