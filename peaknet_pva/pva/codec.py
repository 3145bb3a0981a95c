"""NtNdArray in, NtNdArray out: the one place that parses and builds PVA detector frames.

Input (DESIGN 2.1): an NtNdArray holding either the stacked 2-D slab ``(P*H, W)`` (split into
panels by a ``PanelLayout``) or a 3-D mono ``(P, H, W)`` array, of int8 ... float64, optionally
compressed as ADCore's NDPluginCodec does (``codec.name`` lz4 / bslz4 / blosc / zlib / lz4hdf5, or
HDF5-framed lz4/bslz4 chunks; decoded by ``compression.decompress``, which checks every size
before any decompressor runs; the packages come with the ``codecs`` extra). ``decode_ntndarray`` returns a ``DecodedFrame`` whose pixels are a
COPY (pvapy reuses the PvObject after the callback returns) or raises ``FrameError``.

Output (DESIGN 2.3): ``output_type()`` is the single type definition of what the PeakNet processor
publishes: an NtNdArray plus ::

    peaks:  structure { panel: ushort[], y: float[], x: float[], intensity: float[], npix: uint[] }
    nPeaks: uint        photonEnergy: double (eV)      panelShape: uint[] (H, W)

``build_output`` fills one from a decoded frame and its peaks, as areaDetector would: the input's
NTAttributes passed through unchanged (plus ours), ``codec`` name ``''`` with the pvData scalar type
in ``parameters``. The image is sent as the 2-D slab ``(P*H, W)`` (ColorMode 0, so any areaDetector
client can show it), or as an assembled view with the slab in the extra ``slab`` field, or, when
not forwarded, as an empty array of the same union type with no dimensions. ``placeholder_output``
is the channel's value before the first frame (a 1 x 1 image). ``decode_output`` reads it back.

NTNDArray dimension order: ``dimension[0]`` is the fastest-varying axis (x, columns), so a 2-D
frame of shape ``(rows, cols)`` has ``dimension = [cols, rows]`` and a 3-D ``(P, H, W)`` frame has
``dimension = [W, H, P]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pvaccess as pva

from ..errors import FrameError
from ..frames import PanelLayout, PeakTable, check_dtype
from . import compression

#: Union field of the NtNdArray ``value`` for each numpy dtype (and back).
FIELD_BY_DTYPE: dict[np.dtype, str] = {
    np.dtype("int8"): "byteValue",
    np.dtype("uint8"): "ubyteValue",
    np.dtype("int16"): "shortValue",
    np.dtype("uint16"): "ushortValue",
    np.dtype("int32"): "intValue",
    np.dtype("uint32"): "uintValue",
    np.dtype("int64"): "longValue",
    np.dtype("uint64"): "ulongValue",
    np.dtype("float32"): "floatValue",
    np.dtype("float64"): "doubleValue",
}
DTYPE_BY_FIELD: dict[str, np.dtype] = {v: k for k, v in FIELD_BY_DTYPE.items()}
DTYPE_BY_FIELD["booleanValue"] = np.dtype("bool")

#: pvData scalar type (as int) -> numpy dtype, for the codec's ``parameters`` (uncompressed type).
_DTYPE_BY_SCALAR: dict[int, np.dtype] = {
    int(pva.BYTE): np.dtype("int8"),
    int(pva.UBYTE): np.dtype("uint8"),
    int(pva.SHORT): np.dtype("int16"),
    int(pva.USHORT): np.dtype("uint16"),
    int(pva.INT): np.dtype("int32"),
    int(pva.UINT): np.dtype("uint32"),
    int(pva.LONG): np.dtype("int64"),
    int(pva.ULONG): np.dtype("uint64"),
    int(pva.FLOAT): np.dtype("float32"),
    int(pva.DOUBLE): np.dtype("float64"),
}
_SCALAR_BY_DTYPE: dict[np.dtype, Any] = {
    np.dtype("int8"): pva.BYTE,
    np.dtype("uint8"): pva.UBYTE,
    np.dtype("int16"): pva.SHORT,
    np.dtype("uint16"): pva.USHORT,
    np.dtype("int32"): pva.INT,
    np.dtype("uint32"): pva.UINT,
    np.dtype("int64"): pva.LONG,
    np.dtype("uint64"): pva.ULONG,
    np.dtype("float32"): pva.FLOAT,
    np.dtype("float64"): pva.DOUBLE,
}

#: Compressed-frame codecs decoded here, and the Python modules each one needs (``codecs`` extra).
CODEC_PACKAGES: dict[str, tuple[str, ...]] = dict(compression.CODEC_MODULES)

#: areaDetector ColorMode attribute value for mono images.
COLOR_MODE_MONO = 0

#: Default NtNdArray attribute carrying the photon energy in eV (areaDetector convention).
DEFAULT_PHOTON_ENERGY_ATTRIBUTE = "PhotonEnergy"

#: The extra top-level fields of the output NtNdArray (DESIGN 2.3). One definition, used for
#: every published object and for ``getOutputPvObjectType``.
OUTPUT_EXTRA_FIELDS: dict[str, Any] = {
    "peaks": {
        "panel": [pva.USHORT],
        "y": [pva.FLOAT],
        "x": [pva.FLOAT],
        "intensity": [pva.FLOAT],
        "npix": [pva.UINT],
    },
    "nPeaks": pva.UINT,
    "photonEnergy": pva.DOUBLE,
    "panelShape": [pva.UINT],
    # the (P*H, W) slab when ``value`` holds an assembled view (output_image=assembled), else empty
    "slab": ({name: [_SCALAR_BY_DTYPE[dtype]] for dtype, name in FIELD_BY_DTYPE.items()},),
}

#: areaDetector's NDAttrSource_t value for attributes computed by a plugin (ours).
ATTR_SOURCE_FUNCT = 3


@dataclass
class DecodedFrame:
    """One detector frame taken out of an NtNdArray.

    ``pixels`` is a C-contiguous ``(P, H, W)`` array owned by this object (a copy), in the
    frame's own dtype. Time stamps are integer nanoseconds since the EPICS-independent POSIX
    epoch (``secondsPastEpoch * 1e9 + nanoseconds``). ``attributes`` maps NTAttribute names to
    plain Python values; ``photon_energy_ev`` is the configured attribute's value (eV) or None.
    """

    pixels: np.ndarray
    unique_id: int
    timestamp_ns: int = 0
    data_timestamp_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    photon_energy_ev: float | None = None
    #: The input's NTAttributes as pvaccess reads them (plain dicts, types kept), passed through
    #: unchanged to the output (``build_output``).
    raw_attributes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dtype(self) -> np.dtype:
        return self.pixels.dtype

    @property
    def panel_shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[1]), int(self.pixels.shape[2]))

    @property
    def n_panels(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class OutputMeta:
    """Everything in a published output object except the peak table (see ``decode_output``).

    ``image`` is the forwarded frame as a ``(P, H, W)`` copy, or None when it was not forwarded.
    """

    unique_id: int
    timestamp_ns: int
    data_timestamp_ns: int
    photon_energy_ev: float
    panel_shape: tuple[int, int]
    n_peaks: int
    image: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# time stamps and attributes


def _ts_to_ns(ts: Any) -> int:
    try:
        return int(ts["secondsPastEpoch"]) * 1_000_000_000 + int(ts["nanoseconds"])
    except (KeyError, TypeError):
        return 0


def _ns_to_ts(ns: int) -> Any:
    ns = int(ns)
    return pva.PvTimeStamp(ns // 1_000_000_000, ns % 1_000_000_000, 0)


def _attribute_value(value: Any) -> Any:
    """An NTAttribute ``value`` (a variant union, read as ``(dict, types)``) as a Python value."""
    if isinstance(value, tuple) and value:
        value = value[0]
    if isinstance(value, dict):
        if not value:
            return None
        value = next(iter(value.values()))
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _decode_attributes(pv: Any, keep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """NTAttribute name -> plain value; with ``keep``, also appends the raw attribute dicts to it."""
    out: dict[str, Any] = {}
    try:
        attrs = pv["attribute"]
    except Exception:  # pragma: no cover - every NtNdArray has it
        return out
    if keep is not None:
        keep.extend(attrs)
    for attr in attrs:
        try:
            out[str(attr["name"])] = _attribute_value(attr["value"])
        except (KeyError, TypeError):
            continue
    return out


def _as_float_or_none(value: Any) -> float | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _make_attribute(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        pv_value = pva.PvBoolean(value)
    elif isinstance(value, (int, np.integer)):
        pv_value = pva.PvInt(int(value)) if -(2**31) <= int(value) < 2**31 else pva.PvLong(int(value))
    elif isinstance(value, (float, np.floating)):
        pv_value = pva.PvDouble(float(value))
    else:
        pv_value = pva.PvString(str(value))
    return pva.NtAttribute(name, pv_value)


# ---------------------------------------------------------------------------------------------
# decoding input frames


def _check_codec_package(codec: str) -> None:
    """Raise FrameError unless ``codec`` is one we decode and its packages are installed."""
    compression.check_codec(codec)


def _uncompressed_dtype(pv: Any, codec: str) -> np.dtype:
    """The pixels' dtype from ``codec.parameters``: a PVInt holding the pvData scalar type, as
    ADCore's NTNDArrayConverter (and pvapy) set it."""
    try:
        scalar = _attribute_value(pv["codec.parameters"])
    except Exception as exc:  # pvaccess.FieldNotFound is not a KeyError
        raise FrameError(f"compressed frame ({codec}) without codec.parameters: {exc}") from None
    if isinstance(scalar, bool) or not isinstance(scalar, (int, np.integer)):
        raise FrameError(f"compressed frame ({codec}): codec.parameters {scalar!r} is not a pvData scalar type")
    dtype = _DTYPE_BY_SCALAR.get(int(scalar))
    if dtype is None:
        raise FrameError(f"compressed frame ({codec}): codec.parameters {int(scalar)} is not a numeric pvData type")
    return dtype


def _decompress(pv: Any, data: np.ndarray, codec: str, n_values: int) -> np.ndarray:
    """Decode a compressed payload into ``n_values`` pixels (sizes checked before decoding)."""
    _check_codec_package(codec)
    dtype = _uncompressed_dtype(pv, codec)
    try:
        uncompressed = int(pv["uncompressedSize"])
        compressed = int(pv["compressedSize"])
    except Exception as exc:
        raise FrameError(f"compressed frame ({codec}) without uncompressedSize/compressedSize: {exc}") from None
    return compression.decompress(
        codec, data, dtype, n_values, uncompressed_size=uncompressed, compressed_size=compressed
    )


def _color_mode(attributes: dict[str, Any]) -> int | None:
    value = attributes.get("ColorMode")
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a ColorMode of +-inf
        return None


def decode_ntndarray(
    pv: Any,
    layout: PanelLayout | None = None,
    *,
    photon_energy_attribute: str = DEFAULT_PHOTON_ENERGY_ATTRIBUTE,
    check_finite: bool = True,
) -> DecodedFrame:
    """Decode an input NtNdArray into a ``DecodedFrame`` (pixels ``(P, H, W)``, copied).

    Args:
        pv: the NtNdArray (a ``pvaccess.PvObject``) as handed to ``process``; not kept.
        layout: how a 2-D slab splits into panels (``PanelLayout(None)`` = one panel).
        photon_energy_attribute: NTAttribute holding the photon energy in eV.
        check_finite: reject float frames holding NaN or Inf.

    Raises:
        FrameError: wrong rank (1-D, >3-D, colour), empty, size not matching the dimensions or
            not a multiple of the panel shape, NaN/Inf, unsupported dtype, unknown codec or a
            codec whose package is missing.
    """
    layout = layout or PanelLayout(None)
    raw_attributes: list[dict[str, Any]] = []
    attributes = _decode_attributes(pv, raw_attributes)
    unique_id = int(pv["uniqueId"])

    sizes = [int(d["size"]) for d in pv["dimension"]]
    if not sizes:
        raise FrameError(f"frame {unique_id}: empty frame (no dimensions)")
    if len(sizes) == 1:
        raise FrameError(f"frame {unique_id}: 1-D frame of {sizes[0]} values; need 2-D (P*H, W) or 3-D (P, H, W)")
    if len(sizes) > 3:
        raise FrameError(f"frame {unique_id}: {len(sizes)}-D frame; need 2-D (P*H, W) or 3-D (P, H, W)")
    if len(sizes) == 3:
        mode = _color_mode(attributes)
        if mode not in (None, COLOR_MODE_MONO):
            raise FrameError(f"frame {unique_id}: colour frame (ColorMode={mode}) is not supported")
    shape = tuple(reversed(sizes))
    if min(shape) <= 0:
        raise FrameError(f"frame {unique_id}: empty frame of shape {shape}")

    union_field = pv.getSelectedUnionFieldName()
    if not union_field:
        raise FrameError(f"frame {unique_id}: empty frame (no value selected)")
    if union_field not in DTYPE_BY_FIELD:
        raise FrameError(f"frame {unique_id}: unknown value field {union_field!r}")
    data = pv["value"][0][union_field]

    codec = str(pv["codec"]["name"] or "")
    if codec:
        try:
            data = _decompress(pv, data, codec, int(np.prod(shape, dtype=object)))
        except FrameError as exc:
            raise FrameError(f"frame {unique_id}: {exc}") from None
    try:
        dtype = check_dtype(data.dtype if codec else DTYPE_BY_FIELD[union_field])
    except FrameError as exc:
        raise FrameError(f"frame {unique_id}: {exc}") from None

    n = int(np.prod(shape))
    if data.size == 0:
        raise FrameError(f"frame {unique_id}: empty frame (no pixel data)")
    if data.size != n:
        raise FrameError(f"frame {unique_id}: {data.size} values do not fill the dimensions {shape}")
    pixels = np.array(np.asarray(data, dtype=dtype).reshape(shape), copy=True, order="C")
    try:
        pixels = layout.split(pixels)
    except FrameError as exc:
        raise FrameError(f"frame {unique_id}: {exc}") from None

    if check_finite and pixels.dtype.kind == "f":
        # A cheap sum first; only a non-finite sum (NaN/Inf, or overflow) needs the full check.
        if not np.isfinite(np.add.reduce(pixels, axis=None, dtype=np.float64)):
            if not np.isfinite(pixels).all():
                raise FrameError(f"frame {unique_id}: frame contains NaN or Inf")

    return DecodedFrame(
        pixels=pixels,
        unique_id=unique_id,
        timestamp_ns=_ts_to_ns(pv["timeStamp"]),
        data_timestamp_ns=_ts_to_ns(pv["dataTimeStamp"]),
        attributes=attributes,
        photon_energy_ev=_as_float_or_none(attributes.get(photon_energy_attribute)),
        raw_attributes=raw_attributes,
    )


# ---------------------------------------------------------------------------------------------
# building input frames (replay server, tests)


def encode_ntndarray(
    pixels: np.ndarray,
    *,
    unique_id: int,
    timestamp_ns: int | None = None,
    data_timestamp_ns: int | None = None,
    attributes: dict[str, Any] | None = None,
    three_d: bool = False,
) -> Any:
    """Build an input NtNdArray from ``pixels`` (uncompressed).

    ``pixels`` is 2-D ``(rows, cols)`` or 3-D ``(P, H, W)`` (sent 3-D if ``three_d`` else as the
    stacked slab ``(P*H, W)``). No validation: the replay server uses this to send bad frames
    too (1-D, empty, NaN, int64, ...). ``timestamp_ns`` defaults to now.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and not three_d:
        pixels = pixels.reshape(pixels.shape[0] * pixels.shape[1], pixels.shape[2])
    if pixels.dtype == np.bool_:
        union_field = "booleanValue"
    else:
        union_field = FIELD_BY_DTYPE.get(pixels.dtype)
    if union_field is None:
        raise FrameError(f"no NtNdArray value field for dtype {pixels.dtype}")
    nt = pva.NtNdArray()
    flat = np.ascontiguousarray(pixels).reshape(-1)
    nt["value"] = {union_field: flat}
    nt["dimension"] = [pva.PvDimension(int(s), 0, int(s), 1, False) for s in reversed(pixels.shape)]
    nbytes = int(flat.size * flat.itemsize)
    nt["compressedSize"] = nbytes
    nt["uncompressedSize"] = nbytes
    nt["uniqueId"] = int(unique_id)
    now = time.time_ns() if timestamp_ns is None else int(timestamp_ns)
    nt["timeStamp"] = _ns_to_ts(now)
    nt["dataTimeStamp"] = _ns_to_ts(now if data_timestamp_ns is None else data_timestamp_ns)
    attrs = {"ColorMode": COLOR_MODE_MONO}
    attrs.update(attributes or {})
    nt["attribute"] = [_make_attribute(k, v) for k, v in attrs.items()]
    return nt


def compress_ntndarray(nt: Any, pixels: np.ndarray, codec_name: str, *, hdf5_framed: bool = False) -> Any:
    """Replace ``nt``'s value by ``pixels`` compressed with ``codec_name``, as ADCore's
    NDPluginCodec + NTNDArrayConverter publish it: ``value.ubyteValue`` = the compressed bytes,
    ``compressedSize`` = their number, ``uncompressedSize`` = pixels x itemsize, ``codec.name``,
    ``codec.parameters`` = PVInt(pvData scalar type of the pixels). Dimensions are unchanged.
    ``hdf5_framed``: send lz4/bslz4 as the HDF5 chunk (what ``pvapy-ad-sim-server -hcm`` sends).
    Returns ``nt``."""
    pixels = np.ascontiguousarray(pixels)
    if not codec_name:
        return nt
    payload = np.frombuffer(compression.compress(codec_name, pixels, hdf5_framed=hdf5_framed), np.uint8)
    nt["value"] = {"ubyteValue": payload}
    nt["codec"] = {"name": codec_name, "parameters": pva.PvInt(int(_SCALAR_BY_DTYPE[pixels.dtype]))}
    nt["compressedSize"] = int(payload.size)
    nt["uncompressedSize"] = int(pixels.nbytes)
    return nt


# ---------------------------------------------------------------------------------------------
# output structure


_OUTPUT_TEMPLATE: Any = None


def output_type() -> Any:
    """A fresh, empty output object: NtNdArray + the fields of ``OUTPUT_EXTRA_FIELDS``."""
    global _OUTPUT_TEMPLATE
    if _OUTPUT_TEMPLATE is None:
        _OUTPUT_TEMPLATE = pva.NtNdArray(OUTPUT_EXTRA_FIELDS)
    return _OUTPUT_TEMPLATE.copy()


def placeholder_output() -> Any:
    """The output record's value before the first frame: a 1 x 1 mono image (uniqueId 0).

    An empty NTNDArray is an error to image viewers (c2dataviewer logs "Invalid data/color mode
    data" at its poll rate until the first hit arrives); this is a valid image of nothing. Same
    structure as ``output_type()``; ``decode_output`` reads it as a frame without image.
    """
    out = output_type()
    out["value"] = {"ubyteValue": np.zeros(1, np.uint8)}
    out["dimension"] = _dimensions((1, 1))
    out["codec"] = {"name": "", "parameters": pva.PvInt(int(pva.UBYTE))}
    out["compressedSize"] = 1
    out["uncompressedSize"] = 1
    out["uniqueId"] = 0
    out["attribute"] = [
        _our_attribute("ColorMode", COLOR_MODE_MONO, pva.INT, "Color mode"),
        _our_attribute("PeakNetImage", "placeholder", pva.STRING, "no frame processed yet"),
    ]
    out["photonEnergy"] = float("nan")
    return out


def _our_attribute(name: str, value: Any, scalar: Any, descriptor: str) -> dict[str, Any]:
    """An NTAttribute (as the dict pvaccess takes) for a value peaknet-pva adds to the output."""
    return {
        "name": name,
        "value": ({"value": value}, {"value": scalar}),
        "descriptor": descriptor,
        "sourceType": ATTR_SOURCE_FUNCT,
        "source": "peaknet_pva",
    }


def _dimensions(shape: tuple[int, ...], binning: int = 1) -> list[Any]:
    return [pva.PvDimension(int(n), 0, int(n), int(binning), False) for n in reversed(shape)]


def build_output(
    frame: DecodedFrame,
    peaks: PeakTable,
    *,
    include_image: bool,
    photon_energy_ev: float | None = None,
    photon_energy_attribute: str = DEFAULT_PHOTON_ENERGY_ATTRIBUTE,
    view: np.ndarray | None = None,
    view_binning: int = 1,
) -> Any:
    """Build the published object for one frame (DESIGN 2.3), as ADCore would publish the image.

    ``uniqueId``, ``timeStamp`` and ``dataTimeStamp`` come from ``frame``; ``photonEnergy`` is
    ``photon_energy_ev`` if given, else the frame's, else NaN. Every input NTAttribute is passed
    through unchanged (type, descriptor, source, sourceType, tags); ours are added:
    ``ColorMode`` (0) and ``photon_energy_attribute`` (eV) when the input has none, and
    ``PeakNetNPeaks``, ``PeakNetImage`` (``slab``/``assembled``/``none``). ``codec`` is set as
    ADCore sets it for an uncompressed array: name ``''``, ``parameters`` = the pvData scalar type
    of the pixels, ``compressedSize == uncompressedSize`` = bytes sent.

    With ``include_image`` the value is the frame as the 2-D slab ``(P*H, W)``, or ``view`` (a
    2-D assembled image, e.g. :class:`peaknet_pva.assemble.Assembler`) with the slab in the
    ``slab`` field so a CXI writer still gets the pixels; without, an empty array of the frame's
    dtype and no dimensions. Either way the structure is that of ``output_type()``.
    """
    out = output_type()
    pixels = frame.pixels
    p, h, w = pixels.shape
    union_field = FIELD_BY_DTYPE[pixels.dtype]
    kind = "none"
    if include_image:
        slab = pixels.reshape(-1)
        if view is not None:
            view = np.ascontiguousarray(view, dtype=pixels.dtype)
            flat = view.reshape(-1)
            out["dimension"] = _dimensions(view.shape, max(int(view_binning), 1))
            out["slab"] = {union_field: slab}
            kind = "assembled"
        else:
            flat = slab
            out["dimension"] = _dimensions((p * h, w))
            kind = "slab"
        out["value"] = {union_field: flat}
        nbytes = int(flat.size * flat.itemsize)
    else:
        out["value"] = {union_field: np.zeros(0, pixels.dtype)}
        nbytes = 0
    out["codec"] = {"name": "", "parameters": pva.PvInt(int(_SCALAR_BY_DTYPE[pixels.dtype]))}
    out["compressedSize"] = nbytes
    out["uncompressedSize"] = nbytes
    out["uniqueId"] = int(frame.unique_id)
    out["timeStamp"] = _ns_to_ts(frame.timestamp_ns)
    out["dataTimeStamp"] = _ns_to_ts(frame.data_timestamp_ns)
    if photon_energy_ev is None:
        photon_energy_ev = frame.photon_energy_ev
    energy = float("nan") if photon_energy_ev is None else float(photon_energy_ev)
    attributes = list(frame.raw_attributes)
    names = {str(a.get("name", "")) for a in attributes}
    if "ColorMode" not in names:
        attributes.append(_our_attribute("ColorMode", COLOR_MODE_MONO, pva.INT, "Color mode"))
    if photon_energy_attribute not in names:
        attributes.append(_our_attribute(photon_energy_attribute, energy, pva.DOUBLE, "Photon energy (eV)"))
    attributes.append(_our_attribute("PeakNetNPeaks", int(peaks.n), pva.INT, "Bragg peaks found by peaknet-pva"))
    binning = f", binned {view_binning}x{view_binning}" if kind == "assembled" and view_binning > 1 else ""
    attributes.append(_our_attribute("PeakNetImage", kind, pva.STRING, f"image payload: slab, assembled or none{binning}"))
    out["attribute"] = attributes
    out["peaks"] = {
        "panel": peaks.panel,
        "y": peaks.y,
        "x": peaks.x,
        "intensity": peaks.intensity,
        "npix": peaks.npix,
    }
    out["nPeaks"] = int(peaks.n)
    out["photonEnergy"] = energy
    out["panelShape"] = np.array([h, w], dtype=np.uint32)
    return out


def _slab_field(pv: Any) -> np.ndarray | None:
    """The ``slab`` field's pixels (flat), or None when it is empty or absent."""
    try:
        selected = pv.getSelectedUnionFieldName("slab")
    except Exception:  # an older output structure without the field
        return None
    if not selected:
        return None
    data = np.asarray(pv["slab"][0][selected])
    return data if data.size else None


def decode_output(pv: Any) -> tuple[PeakTable, OutputMeta]:
    """Read a published output object back: its peak table and everything else.

    Raises FrameError if ``pv`` does not have the output structure.
    """
    try:
        pk = pv["peaks"]
        panel_shape = tuple(int(v) for v in np.asarray(pv["panelShape"]).tolist())
        n_peaks = int(pv["nPeaks"])
        energy = float(pv["photonEnergy"])
    except Exception as exc:  # pvaccess.FieldNotFound is not a KeyError
        raise FrameError(f"not a peaknet output object ({exc})") from None
    peaks = PeakTable(
        panel=np.array(pk["panel"], dtype=np.uint16),
        y=np.array(pk["y"], dtype=np.float32),
        x=np.array(pk["x"], dtype=np.float32),
        intensity=np.array(pk["intensity"], dtype=np.float32),
        npix=np.array(pk["npix"], dtype=np.uint32),
    )
    image = None
    layout = PanelLayout(panel_shape if len(panel_shape) == 2 and min(panel_shape) > 0 else None)
    slab = _slab_field(pv)
    if slab is not None:  # value is an assembled view: the pixels are in the slab field
        if layout.panel_shape is None or slab.size % (layout.panel_shape[0] * layout.panel_shape[1]):
            raise FrameError(f"slab of {slab.size} values does not fit panelShape {panel_shape}")
        h, w = layout.panel_shape
        image = np.array(slab.reshape(-1, h, w), copy=True)
    elif len(pv["dimension"]) > 0 and len(panel_shape) == 2:  # no panelShape: the placeholder
        image = decode_ntndarray(pv, layout, check_finite=False).pixels
    meta = OutputMeta(
        unique_id=int(pv["uniqueId"]),
        timestamp_ns=_ts_to_ns(pv["timeStamp"]),
        data_timestamp_ns=_ts_to_ns(pv["dataTimeStamp"]),
        photon_energy_ev=energy,
        panel_shape=(panel_shape[0], panel_shape[1]) if len(panel_shape) == 2 else (0, 0),
        n_peaks=n_peaks,
        image=image,
    )
    return peaks, meta


def same_structure(a: Any, b: Any) -> bool:
    """True if two PvObjects have the same introspection (the PVA structure)."""
    return a.getIntrospectionDict() == b.getIntrospectionDict()
