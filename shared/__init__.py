"""DAA Prime protocol package: pure Python (stdlib only at import time), runs in Pyodide too."""

from shared.frame import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
