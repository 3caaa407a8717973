"""The content filter's marks on the fields of a row: stored with it, shown to every later reader."""
import json


def flags_json(flagged, fields, kept=None):
    """The filter's flags on these fields, as stored (`{field: rule}` in JSON, None for none), over the ones a
    row already `kept` for its other fields."""
    marks = {k: v for k, v in json.loads(kept).items() if k not in fields} if kept else {}
    marks.update((field, rule) for field, rule in flagged or () if field in fields)
    return json.dumps(marks, sort_keys=True) if marks else None


def with_flags(view: dict, row) -> dict:
    """A row's view, with `flagged` ({field: rule}) when the filter flagged any of its text."""
    if row["flags"]:
        view["flagged"] = json.loads(row["flags"])
    return view
