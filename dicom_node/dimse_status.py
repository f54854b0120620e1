"""The DIMSE statuses of the node: what its C-STORE handler answers, and how it reads what a
peer answers it (PS3.4 Annex B.2.3, PS3.7 Annex C).

The handler returns one of the named codes below, never a bare number. What a peer answers is
read through pynetdicom's own status tables: a Success or a Warning means the peer stored the
object (a Warning is "stored, with a remark": coerced or discarded elements, a data set that
does not match the SOP class), anything else means it did not.
"""

from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # refused: disk nearly full or spool write failed
DATASET_MISMATCH = 0xA900  # error: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # error: cannot understand (unparseable data set)
MISSING_ATTRIBUTE = 0x0120  # failure: missing attribute
NOT_AUTHORISED = 0x0124  # failure: refused, not authorised
INVALID_UID = DATASET_MISMATCH  # a UID that is not one: PS3.4 B.2.3 has no status of its own


def stored(code: int) -> bool:
    """Whether a peer's C-STORE status says it stored the object (Success or Warning)."""
    return code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING)


def describe(code: int) -> str:
    """A status as logs and error messages show it: "0xA700 (Failure: Refused: Out of
    Resources)"."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(
        code, (code_to_category(code), "")
    )
    return f"0x{code:04X} ({category}{': ' + meaning if meaning else ''})"


#: An Error Comment (0000,0902) is LO: at most 64 characters.
ERROR_COMMENT_MAX = 64


def error_comment(reason: str) -> str:
    """A refusal's reason as an Error Comment: one line of LO characters (no backslash, no
    control characters), at most 64, cut at a word with "..." when longer."""
    text = " ".join("".join(c if c.isprintable() and c != "\\" else " " for c in reason).split())
    if len(text) <= ERROR_COMMENT_MAX:
        return text
    cut = text[: ERROR_COMMENT_MAX - 3]
    if " " in cut[20:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:(") + "..."
