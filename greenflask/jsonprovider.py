"""Flask's JSON answers written by orjson (a Rust encoder) instead of the standard library.

Only `dumps`, which every answer goes through; request bodies are still read by Flask's own
`json.loads`, whose handling of malformed input (NaN, Infinity, deep nesting) the
validation relies on. Measured in BENCHMARKS.md ("Speed").
"""

import orjson
from flask.json.provider import DefaultJSONProvider


class OrjsonProvider(DefaultJSONProvider):
    def dumps(self, obj, **kwargs) -> str:
        # NON_STR_KEYS: SQLAlchemy's row keys are a str subclass, which orjson refuses by default.
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()
