"""The public API's docstrings: every public function and class (and the modules' call
methods) has Args, Returns, Raises and Example sections, points at no file the installed
wheel lacks, and its examples pass as doctests. The public signatures are annotated."""
import doctest
import inspect

import pytest
import torch

import contrastive_kernels as ck

SECTIONS = ("Args:", "Returns:", "Raises:", "Example:")
# paths of the source checkout, absent from an installed wheel
FORBIDDEN = ("docs/", "DESIGN.md", "README", "tests/", "bench/")
# need a process group: their examples are snippets, not doctests
DISTRIBUTED = {"ring_info_nce", "gather_info_nce", "ring_siglip_loss", "gather_siglip_loss"}
METHODS = {"FusedInfoNCE.forward": ck.FusedInfoNCE.forward,
           "FusedSigLIPLoss.forward": ck.FusedSigLIPLoss.forward,
           "GradCache.__call__": ck.GradCache.__call__}
PUBLIC_MODULES = ("contrastive_kernels", "contrastive_kernels.reference",
                  "contrastive_kernels.loss", "contrastive_kernels.metrics",
                  "contrastive_kernels.modules", "contrastive_kernels.distributed",
                  "contrastive_kernels.gradcache", "contrastive_kernels.options")


def _public():
    """{name: object}: the functions and classes of ck.__all__, the call methods, and the
    functions of ck.reference."""
    out = {n: getattr(ck, n) for n in ck.__all__
           if inspect.isfunction(getattr(ck, n)) or inspect.isclass(getattr(ck, n))}
    out.update(METHODS)
    out.update({f"reference.{n}": f for n, f in inspect.getmembers(ck.reference,
                                                                   inspect.isfunction)
                if not n.startswith("_") and f.__module__ == ck.reference.__name__})
    return out


PUBLIC = _public()
# the signatures that carry type hints (the reference mirrors them without)
ANNOTATED = [n for n in PUBLIC if not n.startswith("reference.")]


def test_the_public_list_is_complete():
    assert {"info_nce", "siglip_loss", "uniformity_loss", "alignment_loss",
            "retrieval_metrics", "FusedInfoNCE", "FusedSigLIPLoss", "GradCache",
            "available_backends", "Options", "make_options"} | DISTRIBUTED <= set(PUBLIC)
    assert "reference.info_nce" in PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_sections(name):
    doc = inspect.getdoc(PUBLIC[name]) or ""
    missing = [s for s in SECTIONS if s not in doc]
    assert not missing, f"{name}: docstring lacks {missing}"
    # each section starts a line of its own, in the usual order
    lines = [line.strip() for line in doc.splitlines()]
    at = [lines.index(s) for s in SECTIONS]
    assert at == sorted(at), f"{name}: sections out of order"


@pytest.mark.parametrize("name", sorted(PUBLIC) + [f"module {m}" for m in PUBLIC_MODULES])
def test_no_paths_outside_the_package(name):
    if name.startswith("module "):
        import importlib
        doc = importlib.import_module(name.split()[1]).__doc__ or ""
    else:
        doc = inspect.getdoc(PUBLIC[name]) or ""
    found = [p for p in FORBIDDEN if p in doc]
    assert not found, f"{name}: docstring refers to {found}"


def test_symmetric_defaults_are_stated():
    """info_nce and FusedInfoNCE differ in their default `symmetric`: both say so."""
    assert inspect.signature(ck.info_nce).parameters["symmetric"].default is False
    assert inspect.signature(ck.FusedInfoNCE).parameters["symmetric"].default is True
    for obj in (ck.info_nce, ck.FusedInfoNCE, ck.FusedInfoNCE.forward):
        doc = inspect.getdoc(obj)
        assert "symmetric=False" in doc and "True" in doc, obj


def _run_doctests(obj, name):
    """(failed, attempted, report) of the examples in obj's own docstring."""
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(
        verbose=False, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    report = []
    for test in finder.find(obj, name, globs={}):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    return result.failed, result.attempted, "".join(report)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_doctests(name):
    torch.manual_seed(0)
    failed, attempted, report = _run_doctests(PUBLIC[name], name)
    assert failed == 0, report
    if name in DISTRIBUTED:
        assert attempted == 0, f"{name}: a doctest needs a process group; use a snippet"
    else:
        assert attempted > 0, f"{name}: no runnable example"


@pytest.mark.parametrize("name", sorted(ANNOTATED))
def test_signatures_are_annotated(name):
    obj = PUBLIC[name]
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    bare = [p.name for p in sig.parameters.values()
            if p.name != "self" and p.annotation is inspect.Parameter.empty]
    assert not bare, f"{name}: parameters without a type hint: {bare}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return hint"
