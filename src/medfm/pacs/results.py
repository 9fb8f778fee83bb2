"""Model results as DICOM objects a PACS files under the source study (built with highdicom).

- :func:`findings_sr`: a TID 1500 Measurement Report (Comprehensive 3D SR), one measurement group per
  finding: its probability (UCUM ``{probability}``) and Present/Absent, referencing the source image.
- :func:`mask_seg`: a BINARY Segmentation, one segment per label, algorithm type AUTOMATIC.
- :func:`overlay_sc`: an RGB secondary capture: the windowed image with the mask as a translucent colour
  overlay and the top finding burned in.

Each lands in the source's study (same Study Instance UID and patient attributes, which DICOM requires and
highdicom copies from the source; that is the one place identifiers travel, back to the PACS they came
from) in a new series. UIDs are derived from the source UIDs and the model hash, so building the results
of one instance twice gives the same UIDs and a PACS stores them once.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medfm.pacs.types import MANUFACTURER, InstanceResult

SERIES_NUMBERS = {"sr": 9901, "seg": 9902, "sc": 9903}
# Finding and segment names come from the model's label names, which map to no standard terminology:
# they travel as codes of a local coding scheme (PS3.16 allows private schemes starting with "99").
LOCAL_SCHEME = "99MEDFM"
ALPHA = 0.4  # overlay opacity: the anatomy must stay readable under the mask


def _model(result: InstanceResult) -> tuple[str, str, str]:
    m = result.model or {}
    name = str(m.get("name") or "model")
    digest = str(m.get("hash") or "")
    version = str(m.get("version") or digest or "unknown")
    return name, digest, version


def _uid(result: InstanceResult, kind: str, level: str) -> str:
    """Deterministic UID for the result series/instance of one kind (sr, seg, sc) of this source + model."""
    src = result.source
    base = str(src.SeriesInstanceUID if level == "series" else src.SOPInstanceUID)
    return generate_uid(entropy_srcs=[base, *_model(result), kind, level])


def _code(name: str) -> Any:
    from highdicom.sr import CodedConcept

    value = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unnamed"
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=name[:64])


def _describe(ds: pydicom.Dataset, kind: str, model_name: str) -> pydicom.Dataset:
    # The watcher recognises medfm's own results by this description (and the manufacturer).
    ds.SeriesDescription = f"{MANUFACTURER} {kind} {model_name}"[:64]
    return ds


def findings_sr(result: InstanceResult) -> pydicom.Dataset:
    """The findings as a TID 1500 Measurement Report; observer = device "medfm" with the model name/hash."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    src = result.source
    name, digest, version = _model(result)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[name, digest, "device"]), name=MANUFACTURER,
        manufacturer_name=MANUFACTURER, model_name=f"{name} {digest}".strip()[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
    )
    algorithm = hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64])
    source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(src)
    probability = _code("probability")
    groups = []
    for i, f in enumerate(result.findings):
        concept = _code(str(f["name"]))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[str(src.SOPInstanceUID), name, digest, "finding", str(i)]),
                identifier=str(f["name"])[:64],
            ),
            finding_type=concept,
            algorithm_id=algorithm,
            source_images=[source_image],
            measurements=[hd.sr.Measurement(
                name=probability, value=float(f["probability"]),
                unit=Code("{probability}", "UCUM", "probability"), algorithm_id=algorithm,
            )],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                concept, codes.SCT.Present if f.get("positive") else codes.SCT.Absent
            )],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[src], content=report, series_instance_uid=_uid(result, "sr", "series"),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=_uid(result, "sr", "instance"),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
    )
    return _describe(sr, "findings", name)


def _segments(result: InstanceResult) -> tuple[list[int], list[str]]:
    """(label values, names): every named label, else every label present in the mask."""
    if result.segment_names:
        return list(range(1, len(result.segment_names) + 1)), [str(n) for n in result.segment_names]
    labels = [int(v) for v in np.unique(np.asarray(result.mask)) if v != 0]
    return labels, [f"label {v}" for v in labels]


def mask_seg(result: InstanceResult) -> pydicom.Dataset:
    """The mask as a BINARY Segmentation of the source image, one segment per label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if result.mask is None:
        raise ValueError("mask_seg needs a mask (InstanceResult.mask is None)")
    src = result.source
    mask = np.asarray(result.mask)
    if mask.shape[-2:] != (int(src.Rows), int(src.Columns)):
        raise ValueError(f"mask shape {mask.shape} does not match the source image {src.Rows}x{src.Columns}")
    labels, names = _segments(result)
    if not labels:
        raise ValueError("mask has no labels (all background) and no segment names")
    name, digest, version = _model(result)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=name[:64], family=codes.DCM.ArtificialIntelligence, version=version[:64]
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=label_name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=_code(label_name), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
        )
        for i, label_name in enumerate(names)
    ]
    # One binary plane per segment: label values need not be 1..N, segment numbers must be.
    planes = np.stack([mask == v for v in labels], axis=-1).astype(np.uint8)
    if planes.ndim == 3:
        planes = planes[None]
    seg = hd.seg.Segmentation(
        source_images=[_seg_source(src)], pixel_array=planes, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=_uid(result, "seg", "series"),
        series_number=SERIES_NUMBERS["seg"], sop_instance_uid=_uid(result, "seg", "instance"),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=name[:64],
        software_versions=version[:64], device_serial_number=digest[:64] or "unknown",
        omit_empty_frames=False,  # an empty segment is a result too ("nothing found")
    )
    return _describe(seg, "segmentation", name)


def _seg_source(src: pydicom.Dataset) -> pydicom.Dataset:
    """The source as highdicom should see it for a SEG.

    A projection image (no frame of reference) with Pixel Spacing makes highdicom 0.28 write a Pixel
    Measures item without Slice Thickness, which its own ``segread`` then rejects; such images carry their
    geometry in Imager Pixel Spacing anyway, so Pixel Spacing is left out of the view highdicom gets.
    """
    if "FrameOfReferenceUID" in src or "PixelSpacing" not in src:
        return src
    view = pydicom.Dataset()
    view.file_meta = src.file_meta
    for elem in src:
        if elem.keyword != "PixelSpacing":
            view.add(elem)
    return view


def _grey_u8(src: pydicom.Dataset) -> np.ndarray:
    """The source pixels as displayed (modality + VOI window, MONOCHROME1 inverted) in 8 bit RGB."""
    from medfm.data.readers.dicom import apply_window, values

    raw = np.asarray(src.pixel_array)
    if int(src.get("SamplesPerPixel", 1) or 1) == 3:
        scale = 1.0 if raw.dtype == np.uint8 else 255.0 / max(float(raw.max()), 1.0)
        return (raw * scale).astype(np.uint8)
    vals, info = values(raw, src)
    grey = (apply_window(vals, src, info) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _burn_in(rgb: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(rgb)
    size = max(10, rgb.shape[0] // 24)
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    x = y = max(2, size // 3)
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def overlay_sc(result: InstanceResult, alpha: float = ALPHA) -> pydicom.Dataset:
    """An RGB secondary capture: the windowed source, each label in its colour at `alpha`, top finding as
    text. For people looking at the study in a plain viewer that shows no SEG or SR."""
    import highdicom as hd

    from medfm.tasks.segment.io import PALETTE

    src = result.source
    if int(src.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("overlay_sc takes single-frame images")
    rgb = _grey_u8(src).astype(np.float32)
    if result.mask is not None:
        mask = np.asarray(result.mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the source image {rgb.shape[:2]}")
        for v in np.unique(mask):
            if v == 0:
                continue
            where = mask == v
            colour = PALETTE[int(v) % len(PALETTE) or 1].astype(np.float32)
            rgb[where] = (1 - alpha) * rgb[where] + alpha * colour
    rgb_u8 = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    name, _, _ = _model(result)
    if result.findings:
        top = max(result.findings, key=lambda f: float(f["probability"]))
        rgb_u8 = _burn_in(rgb_u8, f"{name}: {top['name']} {float(top['probability']):.2f}")
    orientation = tuple(str(v) for v in src.get("PatientOrientation") or ())
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=rgb_u8, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=_uid(result, "sc", "series"),
        series_number=SERIES_NUMBERS["sc"], sop_instance_uid=_uid(result, "sc", "instance"),
        instance_number=1, manufacturer=MANUFACTURER,
        # highdicom insists on an orientation; an unknown one stays empty (type 2), never a guessed one
        patient_orientation=orientation if known else ("L", "F"),
    )
    if not known:
        sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = f"{MANUFACTURER} overlay of {name} output"[:1024]
    return _describe(sc, "overlay", name)


def build_results(result: InstanceResult, overlay: bool = True) -> list[pydicom.Dataset]:
    """SR (always), SEG (when the mask has segments) and SC (when `overlay`, for single-frame images)."""
    out = [findings_sr(result)]
    if result.mask is not None and _segments(result)[0]:
        out.append(mask_seg(result))
    if overlay and int(result.source.get("NumberOfFrames", 1) or 1) == 1:
        out.append(overlay_sc(result))
    return out
