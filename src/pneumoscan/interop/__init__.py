"""Interoperability: where the X-rays live. DICOM Structured Reports (:mod:`.sr`), FHIR R4
resources (:mod:`.fhir`) and a DICOMweb PACS round trip (:mod:`.pacs`).

Needs the ``pacs`` extra (highdicom, dicomweb-client, fhir.resources); nothing above this
package imports it at start-up.
"""
