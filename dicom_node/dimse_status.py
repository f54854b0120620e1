"""Named C-STORE statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C): a handler returns one of these."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # refused: disk nearly full or spool write failed
DATASET_MISMATCH = 0xA900  # error: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # error: cannot understand (unparseable data set)
MISSING_ATTRIBUTE = 0x0120  # failure: missing attribute
NOT_AUTHORISED = 0x0124  # failure: refused, not authorised
INVALID_UID = DATASET_MISMATCH  # a UID that is not one: PS3.4 B.2.3 has no status of its own
