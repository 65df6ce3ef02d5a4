"""Flask's JSON answers written by orjson (a Rust encoder) instead of the standard library.

`dumps`, and `response` (what `jsonify` calls), whose body orjson writes as bytes with the
newline Flask ends it with: Flask's own would decode orjson's bytes to a str and the
response encode them back. Request bodies are still read by Flask's own `json.loads`,
whose handling of malformed input (NaN, Infinity, deep nesting) the validation relies on.
Measured in BENCHMARKS.md ("Speed").
"""

import orjson
from flask.json.provider import DefaultJSONProvider

# NON_STR_KEYS: SQLAlchemy's row keys are a str subclass, which orjson refuses by default.
OPTIONS = orjson.OPT_NON_STR_KEYS


class OrjsonProvider(DefaultJSONProvider):
    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj, option=OPTIONS).decode()

    def response(self, *args, **kwargs):
        body = orjson.dumps(self._prepare_response_obj(args, kwargs), option=OPTIONS | orjson.OPT_APPEND_NEWLINE)
        return self._app.response_class(body, mimetype=self.mimetype)
