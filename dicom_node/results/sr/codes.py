"""What the Structured Report says: its coded concepts and fixed texts.

Code choices (all from DICOM PS3.16 / SNOMED CT, as carried by pydicom's code dictionary,
except the local 99CXRN codes for concepts the standard has no code for):

- Procedure reported: SNOMED CT 399208008 "Plain chest X-ray" (a procedure concept that
  does not claim a view count; LOINC 36643-5 is "XR Chest 2 Views", which a single portable
  frontal film is not). CID 100 is extensible, so an SCT procedure code is allowed.
- Present / Absent: SCT 52101004 / SCT 272519000, the values of DICOM CID 241 "Present
  Absent Only" (the DICOM value set uses 272519000, not 2667000, for "Absent").
- Probability: DCM 122157 "Probability", unit UCUM "%" (Percent), value 0..100 with two
  decimals: viewers print a NUM as value and unit code, and "52.53 %" reads as a
  probability where "0.5253 1" (UCUM "1", no units) did not. The summary text gives it as
  0..1 with the threshold ("probability 0.53, threshold 0.46"). Embedding distances stay
  UCUM "1": they are not probabilities.
- The finding in words, first: DCM 121111 "Summary" (TEXT), before the Imaging
  Measurements container, so that a viewer rendering the tree in order shows it on top.
- Contributing equipment purpose: DCM 109102 "Processing Equipment" (CID 7005). There is no
  "Processing Algorithm" code; 109103 is "Modifying Equipment" (changes an instance in place),
  which is not what an algorithm creating a new instance does.
- Finding COVID-19: SCT 840539006 with meaning "COVID-19" (an accepted SNOMED CT synonym);
  the fully specified name is 65 characters, longer than the 64 a Code Meaning (LO) allows.

"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.uid import ComprehensiveSRStorage

from worker.classes import COVID19_SNOMED

COMPREHENSIVE_SR = ComprehensiveSRStorage

# Local coding scheme for concepts DICOM has no code for; "99" marks a private scheme
# (PS3.3 8.2) and the SR documents it in the Coding Scheme Identification Sequence.
LOCAL_SCHEME = "99CXRN"

FINDING_COVID19 = CodedConcept(*COVID19_SNOMED)
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PERCENT = CodedConcept("%", "UCUM", "Percent")
COMMENT = CodedConcept("121106", "DCM", "Comment")
SUMMARY = CodedConcept("121111", "DCM", "Summary")
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")
IDENTIFIER = CodedConcept("125010", "DCM", "Identifier")
STUDY_UID = CodedConcept("110180", "DCM", "Study Instance UID")
SERIES_UID = CodedConcept("112002", "DCM", "Series Instance UID")
SIMILAR_STUDIES = CodedConcept("CXRN001", LOCAL_SCHEME, "Most similar studies")
SIMILAR_HOSPITAL = CodedConcept("CXRN002", LOCAL_SCHEME, "Similar hospital study")
SIMILAR_REFERENCE = CodedConcept("CXRN005", LOCAL_SCHEME, "Similar reference-set image")
NEIGHBOUR_LABEL = CodedConcept("CXRN003", LOCAL_SCHEME, "Label")
NEIGHBOUR_DATASET = CodedConcept("CXRN004", LOCAL_SCHEME, "Dataset")
SIMILAR_IMAGE = CodedConcept("CXRN006", LOCAL_SCHEME, "Similar image")
EMBEDDING_DISTANCE = CodedConcept("CXRN007", LOCAL_SCHEME, "Embedding distance")
AI_PROBABILITY_THEN = CodedConcept("CXRN008", LOCAL_SCHEME, "AI probability at analysis")
CONFIRMED_DIAGNOSIS = CodedConcept("CXRN009", LOCAL_SCHEME, "Confirmed diagnosis")
STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
LUNG = CodedConcept("39607008", "SCT", "Lung")
ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")

#: How a confirmed diagnosis recorded with `cxr-node label` reads in the SR.
DIAGNOSIS_TEXT = {"covid": "COVID-19 (confirmed)", "negative": "COVID-19 negative (confirmed)"}

#: Members whose probabilities span at least this much (highest minus lowest) disagree
#: strongly: the SR says so next to the finding, since the call is then uncertain. 0.25 is a
#: quarter of the scale: members at 0.39 and 0.69 are on both sides of any usual threshold.
DISAGREEMENT_SPREAD = 0.25

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use. Research software; result not verified."
PLUMBING_WARNING = "PLUMBING BUNDLE: random weights, score meaningless"
