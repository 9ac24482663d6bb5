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

import json
import os

# Nipype phones home for a version check when an interface is created; a
# pipeline for medical images must not (and the network may be closed).
os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.base import (BaseInterface, BaseInterfaceInputSpec,  # noqa: E402
                                    Directory, File, OutputMultiObject,
                                    TraitedSpec, isdefined, traits)

from . import io, stepfiles  # noqa: E402
from .bids_names import parse_entities  # noqa: E402
from .stepfiles import parse_estimators, subject_products  # noqa: E402
from .steps import REGISTRY, Product, image_gradient, rish, tensor, validate  # noqa: E402
from .steps.base import option_type, options_of  # noqa: E402
from .steps.image_gradient import resolve_timing  # noqa: E402

#: The JSON record Validate writes beside its outputs.
RECORD_FILE = "record.json"
#: The JSON Harmonize writes: what was applied (the Pydra step's history entry).
INFO_FILE = "harmonization.json"


#: Nipype trait of each option type.
_TRAITS = {bool: traits.Bool, int: traits.Int, float: traits.Float, str: traits.Str}


def option_traits(options_cls) -> dict:
    """One Nipype input trait per option of an Options dataclass: its default,
    its help text as ``desc`` and its choices (an Enum)."""
    out = {}
    for f, info in options_of(options_cls):
        desc = info.help.replace("%(default)s", str(f.default))
        if info.choices:
            out[f.name] = traits.Enum(f.default, *[c for c in info.choices if c != f.default],
                                      usedefault=True, desc=desc)
        elif f.default is None:
            out[f.name] = traits.Either(None, _TRAITS[option_type(f)](), default=None,
                                        usedefault=True, desc=desc)
        else:
            out[f.name] = _TRAITS[option_type(f)](f.default, usedefault=True, desc=desc)
    return out


def option_trait(options_cls, name: str):
    """The trait of one option (under the name a hand-written interface gives it)."""
    return option_traits(options_cls)[name]


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
    exclude_outliers = option_trait(validate.Options, "exclude_outliers")
    fix_gradients = option_trait(validate.Options, "fix_gradients")


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
    fit_method = option_trait(tensor.Options, "fit_method")
    max_bval = option_trait(tensor.Options, "dti_max_bval")
    n_iter = option_trait(tensor.Options, "wls_iterations")


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
    lmax = option_trait(rish.Options, "lmax")


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
#: Old input names of ImageGradient that existing users (and tests) pass, and
#: the option of :mod:`.steps.image_gradient` each sets.
IMAGE_GRADIENT_ALIASES = {"estimators": "image_gradient_estimators",
                          "gradient_separation_ms": "gradient_separation",
                          "gradient_duration_ms": "gradient_duration"}


def _image_gradient_traits() -> dict:
    """The step's option traits (all but the on/off switch) and the old names."""
    generated = option_traits(image_gradient.Options)
    generated.pop("image_gradient")
    aliases = {old: traits.List(traits.Str, desc="estimators as a list (old name)")
               if old == "estimators" else option_trait(image_gradient.Options, new)
               for old, new in IMAGE_GRADIENT_ALIASES.items()}
    return {**generated, **aliases}


ImageGradientInputSpec = type("ImageGradientInputSpec", (_SeriesInputSpec,), {
    "subject": traits.Str(mandatory=True,
                          desc="subject key: seeds the random controls, as in dmriflow run"),
    "sidecar": File(exists=True, desc="DWI JSON sidecar with DiffusionGradientSeparation and "
                                      "DiffusionGradientDuration (s)"),
    **_image_gradient_traits(), "__module__": __name__})


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
        given = {f.name: _defined(getattr(i, f.name))
                 for f, _ in options_of(image_gradient.Options) if f.name != "image_gradient"}
        given.update({new: getattr(i, old) for old, new in IMAGE_GRADIENT_ALIASES.items()
                      if _defined(getattr(i, old)) is not None})   # an old name, given
        options = image_gradient.Options(image_gradient=True, **given)
        series = _series(i)
        timing, source = resolve_timing(options.timing, _abs(i.sidecar), series["dwi"])
        product = subject_products(stepfiles.read_series(series), timing,
                                   parse_estimators(options.image_gradient_estimators),
                                   out_dir, i.subject, options.image_gradient_max_voxels)
        product["parameters"]["timing_source"] = source
        record = io.write_json(product, os.path.join(out_dir, RECORD_FILE))
        files = {key: (parse_entities(key)[0], path) for kind in ("maps", "tables")
                 for key, path in product[kind].items()}
        angles = {e["desc"]: path for e, path in files.values() if e.get("param") == "angle"}
        by_desc = {e["desc"]: path for e, path in files.values() if "param" not in e}
        gold = next(path for e, path in files.values() if e.get("param") == "gradient")
        return {"angle_maps": list(angles.values()), "methods": list(angles),
                "gold_gradient": gold, "summary": by_desc["summary"],
                "histogram": by_desc["histogram"], "record": str(record)}

    def _list_outputs(self):
        return dict(self._result)



# ----------------------------------------------------------------------------
# Generated: one interface per registered step (interfaces/steps)
# ----------------------------------------------------------------------------
#: The JSON a generated interface writes: the step's record, or its product.
PRODUCT_FILE = "product.json"
class _Files:
    """The subject's files as a source step reads them (``key`` and paths)."""

    def __init__(self, inputs):
        self.key = inputs.subject
        for name in ("dwi", "bval", "bvec", "mask", "sidecar"):
            setattr(self, name, _abs(getattr(inputs, name)))


class _RegisteredStep(BaseInterface):
    """Runs the registered step ``_step_name`` on a subject's files (source
    step) or on the record JSON of the step before it."""

    _step_name = ""

    def _run_interface(self, runtime):
        step, i = REGISTRY[self._step_name], self.inputs
        options = step.Options(**{f.name: _defined(getattr(i, f.name))
                                  for f, _ in options_of(step.Options)})
        if step.kind == "source":
            subject, out = i.subject, step.run(_Files(i), options, runtime.cwd)
        else:
            record = json.loads(open(i.record).read())
            subject, out = record["subject"], step.run(record, options, runtime.cwd)
        self._product = isinstance(out, Product)
        if self._product:
            self._result = out.record(subject)
            name = PRODUCT_FILE
        else:
            self._result, name = out, RECORD_FILE
        self._path = str(io.write_json(self._result, os.path.join(runtime.cwd, name)))
        return runtime

    def _list_outputs(self):
        if not self._product:
            return {"record": self._path}
        return {"product": self._path, "maps": [d["path"] for d in self._result["maps"]],
                "tables": [d["path"] for d in self._result["tables"]]}


def make_interface(step):
    """The Nipype interface class of a registered step, ``<Task>Interface``
    (e.g. ``FitTensorInterface``), stored in this module by that name."""
    if step.kind == "source":
        inputs = {"subject": traits.Str(mandatory=True, desc="subject key, e.g. sub-01"),
                  "dwi": File(exists=True, mandatory=True, desc="4D DWI series (NIfTI)"),
                  "bval": File(exists=True, mandatory=True, desc="b-values (FSL text)"),
                  "bvec": File(exists=True, mandatory=True, desc="gradient directions (FSL)"),
                  "mask": File(exists=True, desc="brain mask (default: median Otsu)"),
                  "sidecar": File(exists=True, desc="BIDS JSON sidecar of the DWI")}
    else:
        inputs = {"record": File(exists=True, mandatory=True,
                                 desc="the subject's record (JSON) from the step before")}
    if step.kind == "product":
        outputs = {"product": File(exists=True, desc="the step's product (JSON)"),
                   "maps": OutputMultiObject(File(exists=True), desc="maps (NIfTI)"),
                   "tables": OutputMultiObject(File(exists=True), desc="tables (TSV)")}
    else:
        outputs = {"record": File(exists=True, desc="the subject's record (JSON)")}
    name = f"{step.task}Interface"
    spec_in = type(f"{name}InputSpec", (BaseInterfaceInputSpec,),
                   {**inputs, **option_traits(step.Options)})
    spec_out = type(f"{name}OutputSpec", (TraitedSpec,), outputs)
    cls = type(name, (_RegisteredStep,), {"input_spec": spec_in, "output_spec": spec_out,
                                          "_step_name": step.name,
                                          "__doc__": (step.run.__doc__ or "").strip()})
    for c in (spec_in, spec_out, cls):
        c.__module__ = __name__
        globals()[c.__name__] = c
    return cls


def _make_interfaces() -> dict:
    return {name: make_interface(step) for name, step in REGISTRY.items()}


#: The generated interface of every registered step, by step name.
STEP_INTERFACES = _make_interfaces()

__all__ = ["Validate", "DTIFit", "RISH", "Harmonize", "ImageGradient"] + [
    c.__name__ for c in STEP_INTERFACES.values()]
