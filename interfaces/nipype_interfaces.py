"""dmriflow's per-subject steps as Nipype interfaces.

Each interface is a thin wrapper around the same function the Pydra step
calls (:mod:`dmriflow.interfaces.stepfiles`), so a Nipype workflow and a
``dmriflow run`` write the same maps from the same code. Outputs go to the
interface's working directory (a Nipype node's folder). Bad input raises
:class:`~dmriflow.interfaces.errors.InputError` naming the file.

    from nipype import Node, Workflow
    from dmriflow.interfaces.nipype_interfaces import Validate, DTIFit
    wf = Workflow("dwi", base_dir="work")
    val = Node(Validate(subject="sub-01", dwi=..., bval=..., bvec=...), "validate")
    dti = Node(DTIFit(), "dti")
    wf.connect(val, "dwi", dti, "dwi")   # likewise bval, bvec, mask
    wf.run("MultiProc", plugin_args={"n_procs": 2})
"""

from __future__ import annotations

import os

# Nipype phones home for a version check when an interface is created; a
# pipeline for medical images must not (and the network may be closed).
os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.base import (BaseInterface, BaseInterfaceInputSpec,  # noqa: E402
                                    Directory, File, OutputMultiObject,
                                    TraitedSpec, isdefined, traits)

from . import io, stepfiles  # noqa: E402
from .dti import DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL, FIT_METHODS  # noqa: E402
from .stepfiles import (MODEL_ENTITY, parse_estimators, resolve_timing,  # noqa: E402
                        subject_products)

#: The JSON record Validate writes beside its outputs.
RECORD_FILE = "record.json"
#: The JSON Harmonize writes: what was applied (the Pydra step's history entry).
INFO_FILE = "harmonization.json"


def _defined(value):
    return value if isdefined(value) else None


class _SeriesInputSpec(BaseInterfaceInputSpec):
    dwi = File(exists=True, mandatory=True, desc="4D DWI series (NIfTI)")
    bval = File(exists=True, mandatory=True, desc="b-values (FSL text)")
    bvec = File(exists=True, mandatory=True, desc="gradient directions (FSL text)")
    mask = File(exists=True, mandatory=True, desc="brain mask on the DWI grid")
    exclude = traits.List(traits.Int, desc="volumes left out of the fits (Validate's "
                                           "outlier volumes)")


class _SeriesOutputSpec(TraitedSpec):
    dwi = File(exists=True, desc="4D DWI series")
    bval = File(exists=True, desc="b-values")
    bvec = File(exists=True, desc="gradient directions")
    mask = File(exists=True, desc="brain mask")
    exclude = traits.List(traits.Int, desc="volumes left out of the fits")


def _series(inputs) -> dict:
    series = {k: os.path.abspath(getattr(inputs, k)) for k in stepfiles.SERIES_KEYS}
    return {**series, "exclude": list(_defined(inputs.exclude) or [])}


class _StepInterface(BaseInterface):
    """Runs ``_step()`` in the working directory and keeps its result for outputs."""

    def _run_interface(self, runtime):
        self._result = self._step(runtime.cwd)
        return runtime

    def _step(self, out_dir) -> dict:
        raise NotImplementedError


# ----------------------------------------------------------------------------
class ValidateInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="subject key, e.g. sub-01")
    dwi = File(exists=True, mandatory=True, desc="4D DWI series (NIfTI)")
    bval = File(exists=True, mandatory=True, desc="b-values (FSL text)")
    bvec = File(exists=True, mandatory=True, desc="gradient directions (FSL text)")
    mask = File(exists=True, desc="brain mask (default: median Otsu of the mean b0)")
    sidecar = File(exists=True, desc="BIDS JSON sidecar of the DWI")
    exclude_outliers = traits.Bool(True, usedefault=True,
                                   desc="leave outlier volumes (zero, dropout) out of the fits")
    fix_gradients = traits.Bool(False, usedefault=True,
                                desc="apply the gradient check's winning flip/permutation")


class ValidateOutputSpec(_SeriesOutputSpec):
    record = File(exists=True, desc="JSON record: census, input sha256, QC, series")
    census = traits.Dict(desc="acquisition census row (shells, directions, voxel size, ...)")
    mask_volume_ml = traits.Float(desc="brain mask volume (ml)")
    b0_snr = traits.Float(desc="mean b0 in the mask / noise sigma from b0 differences")
    qc_flags = traits.List(traits.Str, desc="absolute QC flags of the input")


class Validate(_StepInterface):
    """Load and check a subject's DWI, gradients, mask and sidecar; census and QC."""

    input_spec = ValidateInputSpec
    output_spec = ValidateOutputSpec

    def _step(self, out_dir):
        i = self.inputs
        record = stepfiles.validate_subject(i.subject, os.path.abspath(i.dwi),
                                            os.path.abspath(i.bval), os.path.abspath(i.bvec),
                                            _abs(i.mask), _abs(i.sidecar), out_dir=out_dir,
                                            exclude_outliers=i.exclude_outliers,
                                            fix_gradients=i.fix_gradients)
        # the series interfaces take the four files only, so the next steps read
        # the input itself: Validate's uncompressed copy would only take disk
        if record["read"]["copy"]:
            os.unlink(record["read"]["copy"])
            record["series"].pop("copy", None)
            record["read"] = {**record["read"], "copy": "", "decoded_bytes": 0}
        path = io.write_json(record, os.path.join(out_dir, RECORD_FILE))
        return {**record, "record": str(path)}

    def _list_outputs(self):
        r = self._result
        return {**{k: r["series"][k] for k in stepfiles.SERIES_KEYS},
                "exclude": r["series"].get("exclude", []),
                "record": r["record"], "census": r["census"], "qc_flags": r["qc_flags"],
                "mask_volume_ml": r["qc"]["mask_volume_ml"], "b0_snr": r["qc"]["b0_snr"]}


def _abs(path):
    return None if _defined(path) is None else os.path.abspath(path)


# ----------------------------------------------------------------------------
class DTIFitInputSpec(_SeriesInputSpec):
    fit_method = traits.Enum(*FIT_METHODS, usedefault=True, desc="tensor fit")
    max_bval = traits.Float(DTI_MAX_BVAL, usedefault=True,
                            desc="fit the b0s and shells up to this b-value (s/mm^2)")
    n_iter = traits.Int(DEFAULT_WLS_ITERATIONS, usedefault=True,
                        desc="WLS passes (3: as MRtrix3's dwi2tensor; 1: dipy's WLS)")


class DTIFitOutputSpec(TraitedSpec):
    fa = File(exists=True, desc="fractional anisotropy")
    md = File(exists=True, desc="mean diffusivity (mm^2/s)")
    ad = File(exists=True, desc="axial diffusivity (mm^2/s)")
    rd = File(exists=True, desc="radial diffusivity (mm^2/s)")
    v1 = File(exists=True, desc="principal eigenvector (X, Y, Z, 3)")
    s0 = File(exists=True, desc="fitted non-weighted signal")
    median_fa = traits.Float(desc="median FA in the mask")
    failed_voxels = traits.Int(desc="mask voxels whose fit failed")


class DTIFit(_StepInterface):
    """Diffusion tensor fit (dmriflow.interfaces.dti): FA, MD, AD, RD, V1, S0 maps."""

    input_spec = DTIFitInputSpec
    output_spec = DTIFitOutputSpec

    def _step(self, out_dir):
        return stepfiles.write_tensor_maps(_series(self.inputs), out_dir,
                                           self.inputs.fit_method, self.inputs.max_bval,
                                           self.inputs.n_iter)

    def _list_outputs(self):
        r = self._result
        return {**r["maps"], "median_fa": r["median_fa"], "failed_voxels": r["failed_voxels"]}


# ----------------------------------------------------------------------------
class RISHInputSpec(_SeriesInputSpec):
    lmax = traits.Int(0, usedefault=True,
                      desc="highest SH order (0: as each shell's directions allow, <= 8)")


class RISHOutputSpec(TraitedSpec):
    rish_maps = OutputMultiObject(File(exists=True),
                                  desc="RISH maps, shell by shell, orders 0, 2, ... within")
    shells = traits.List(traits.Float, desc="shell of each map")
    orders = traits.List(traits.Int, desc="SH order of each map")


class RISH(_StepInterface):
    """Per-shell SH fit of the b0-normalised signal and its RISH maps."""

    input_spec = RISHInputSpec
    output_spec = RISHOutputSpec

    def _step(self, out_dir):
        return stepfiles.write_rish_maps(_series(self.inputs), out_dir, self.inputs.lmax)

    def _list_outputs(self):
        flat = [(float(b), int(o), p) for b, by in self._result["maps"].items()
                for o, p in by.items()]
        return {"rish_maps": [p for _, _, p in flat], "shells": [b for b, _, _ in flat],
                "orders": [o for _, o, _ in flat]}


# ----------------------------------------------------------------------------
class HarmonizeInputSpec(_SeriesInputSpec):
    subject = traits.Str("subject", usedefault=True, desc="subject key (for messages)")
    artefact = Directory(exists=True, mandatory=True,
                         desc="artefact folder written by 'dmriflow harmonize fit'")
    sidecar = File(exists=True, desc="JSON sidecar of the input (refuses a second application)")


class HarmonizeOutputSpec(_SeriesOutputSpec):
    content_id = traits.Str(desc="content id of the applied artefact")
    info = File(exists=True, desc="JSON: what was applied (history, shells, registration)")


class Harmonize(_StepInterface):
    """Apply a stored RISH harmonization artefact to a DWI series."""

    input_spec = HarmonizeInputSpec
    output_spec = HarmonizeOutputSpec

    def _step(self, out_dir):
        i = self.inputs
        series, entry = stepfiles.harmonize_series(_series(i), os.path.abspath(i.artefact),
                                                   out_dir, i.subject, _abs(i.sidecar))
        info = io.write_json(entry, os.path.join(out_dir, INFO_FILE))
        return {"series": series, "content_id": entry["content_id"], "info": str(info)}

    def _list_outputs(self):
        r = self._result
        return {**r["series"], "content_id": r["content_id"], "info": r["info"]}


# ----------------------------------------------------------------------------
class ImageGradientInputSpec(_SeriesInputSpec):
    subject = traits.Str(mandatory=True,
                         desc="subject key: seeds the random controls, as in dmriflow run")
    sidecar = File(exists=True, desc="DWI JSON sidecar with DiffusionGradientSeparation and "
                                     "DiffusionGradientDuration (s)")
    estimators = traits.List(traits.Str, value=["B"], usedefault=True,
                             desc="estimators to run (B, A, P; see docs/image_gradient.md)")
    gradient_separation_ms = traits.Float(desc="Delta (ms); overrides the sidecar")
    gradient_duration_ms = traits.Float(desc="delta (ms); overrides the sidecar")
    echo_time_ms = traits.Float(desc="TE (ms); overrides the sidecar (recorded only)")
    max_voxels = traits.Int(0, usedefault=True,
                            desc="evaluate a seeded random subset of voxels (0: all)")


class ImageGradientOutputSpec(TraitedSpec):
    angle_maps = OutputMultiObject(File(exists=True),
                                   desc="acute angle (deg) to the gold standard, per method")
    methods = traits.List(traits.Str, desc="BIDS label of each angle map's method: "
                                           "estimators, their nulls, fibre controls (e.g. B, "
                                           "Bshuffle, fibree3)")
    gold_gradient = File(exists=True, desc="finite-difference gradient of the mean b0 (1/mm)")
    summary = File(exists=True, desc="per-method and FA-stratum angle statistics (TSV)")
    histogram = File(exists=True, desc="angle histograms (TSV)")
    record = File(exists=True, desc="JSON product record (maps, tables, parameters)")


class ImageGradient(_StepInterface):
    """Image-gradient estimates, their nulls and fibre-only controls, and angles
    to the finite-difference gold standard (the pipeline's image-gradient step)."""

    input_spec = ImageGradientInputSpec
    output_spec = ImageGradientOutputSpec

    def _step(self, out_dir):
        # the Pydra step's own file-level functions (one implementation)
        i = self.inputs
        overrides = {k: _defined(v) for k, v in (("Delta", i.gradient_separation_ms),
                                                 ("delta", i.gradient_duration_ms),
                                                 ("TE", i.echo_time_ms))}
        series = _series(i)
        timing, source = resolve_timing(overrides, _abs(i.sidecar), series["dwi"])
        product = subject_products(stepfiles.read_series(series), timing,
                                   parse_estimators(i.estimators), out_dir, i.subject,
                                   i.max_voxels)
        product["parameters"]["timing_source"] = source
        record = io.write_json(product, os.path.join(out_dir, RECORD_FILE))
        prefix = f"{MODEL_ENTITY}_desc-"
        angles = {k[len(prefix):-len("_param-angle")]: v for k, v in product["maps"].items()
                  if k.endswith("_param-angle")}
        return {"angle_maps": list(angles.values()), "methods": list(angles),
                "gold_gradient": product["maps"][f"{prefix}goldstandard_param-gradient"],
                "summary": product["tables"][f"{prefix}summary"],
                "histogram": product["tables"][f"{prefix}histogram"], "record": str(record)}

    def _list_outputs(self):
        return dict(self._result)


__all__ = ["Validate", "DTIFit", "RISH", "Harmonize", "ImageGradient"]
