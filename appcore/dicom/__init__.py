"""DICOM and DICOMweb: a PACS-backed datastore, local decoding with geometry checks, DICOM SEG."""
