"""JSON for processes that start often (the hooks, the MCP server) through CPython's C accelerator alone.

Importing the json package imports re and enum: about 8 ms of a hook process that starts on every edit, as
much as Python's own start. The C scanner and encoder behind json need neither. Where they are missing or do
not behave as json does (another Python), this is the json package itself. It writes compact JSON, as the
broker does.
"""
try:
    from _json import encode_basestring, encode_basestring_ascii, make_encoder, make_scanner
except ImportError:             # not CPython: the json package
    make_scanner = None

WHITESPACE = " \t\n\r"


class _Decoding:
    """The settings the C scanner reads from a json.JSONDecoder: json.loads's defaults."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int, parse_constant = float, int, float     # float("NaN") and float("Infinity"), as json


def _not_serializable(value):
    raise TypeError(f"a {type(value).__name__} is not JSON serializable")


def _c_loads(given):
    try:
        text = given.decode("utf-8") if isinstance(given, (bytes, bytearray)) else given
        value, end = _scan(text, len(text) - len(text.lstrip(WHITESPACE)))
        if not text[end:].strip(WHITESPACE):
            return value
    except (StopIteration, SystemError, UnicodeDecodeError):    # the C scanner reports a syntax error through
        pass                                                    # json.decoder, if loaded
    import json             # anything else (not JSON, a BOM, UTF-16): the json package decides, as it would have
    return json.loads(given)


def _c_dumps(value, ensure_ascii: bool = True, sort_keys: bool = False) -> str:
    """No check for cycles (json's check_circular=False): the encoders are shared by threads and calls, and
    what we write has none (a cycle would end in RecursionError)."""
    key = (ensure_ascii, sort_keys)
    encode = _encoders.get(key)
    if encode is None:
        encode = _encoders[key] = make_encoder(None, _not_serializable, encode_basestring_ascii if ensure_ascii
                                               else encode_basestring, None, ":", ",", sort_keys, False, True)
    return "".join(encode(value, 0))


def _behaves_as_json() -> bool:
    sample = '{"a":[1,2.5,"\\u00e9\\"",true,null],"b":{"c":"d"}}'
    try:
        return _c_loads(sample) == {"a": [1, 2.5, 'é"', True, None], "b": {"c": "d"}} and \
            _c_dumps(_c_loads(sample)) == sample and _c_dumps({"é": 1}, False) == '{"é":1}'
    except Exception:
        return False


_encoders = {}
if make_scanner is not None:
    _scan = make_scanner(_Decoding())
if make_scanner is not None and _behaves_as_json():
    loads, dumps = _c_loads, _c_dumps
else:
    import json

    def loads(text):
        return json.loads(text)

    def dumps(value, ensure_ascii: bool = True, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=(",", ":"))
