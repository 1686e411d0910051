"""Params files generated to be wrong (and some to be right), and what the loader makes of them.

Every generated case knows, by construction, whether it is valid and which key or section a
refusal must name. `classify` loads it the way a stage does (`pipeline.config.load_params`
on a file) and sorts the outcome:

- clear: a `ConfigError` of one line, at most 400 characters, naming the key
- accepted-bad: a wrong file loaded without error
- refused-good: a valid file refused
- unclear: a `ConfigError` that is multi-line, too long, or does not name the key
- traceback: any other exception

tests/test_params_fuzz.py asserts that only `clear` (for bad cases) and `accepted` (for good
ones) occur. Run this file to print the tally of a larger draw:

    .venv/bin/python tests/params_fuzz.py --examples 5000
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msdm.config import SEED_MAX, TRAIN_SET_SIZES, ConfigError  # noqa: E402
from pipeline.config import PipelineParams, load_params  # noqa: E402

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SECTIONS = {f.name: f.type for f in dataclasses.fields(PipelineParams)}
HINTS = {name: typing.get_type_hints(typing.get_type_hints(PipelineParams)[name]) for name in SECTIONS}
FIELDS = {name: {f.name: f for f in dataclasses.fields(typing.get_type_hints(PipelineParams)[name])}
          for name in SECTIONS}
SCALAR_FIELDS = [(s, k) for s in FIELDS for k in FIELDS[s] if HINTS[s][k] is not list]


@dataclass
class Case:
    kind: str           # what was done to the file
    data: bytes         # the file
    names: tuple = ()   # a refusal must name one of these (key, section or path); () for good cases
    good: bool = False


def dump(raw) -> bytes:
    return yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     allow_unicode=True).encode()


def with_value(section: str, key: str, value) -> dict:
    raw = {s: dict(v) for s, v in BASE.items()}
    raw[section][key] = value
    return raw


huge_ints = st.integers(min_value=310, max_value=400).map(lambda digits: 10 ** digits)
junk_text = st.text(min_size=1, max_size=30).filter(lambda t: t.strip() != "")
wrong_types = st.one_of(st.none(), st.booleans(), junk_text, st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2))


@st.composite
def bad_scalar(draw) -> Case:
    """One scalar field set to a value of the wrong type, outside its range, or not one of its choices."""
    section, key = draw(st.sampled_from(SCALAR_FIELDS))
    tp, meta = HINTS[section][key], FIELDS[section][key].metadata
    options = []
    if tp is bool:
        options += [st.integers(), st.none(), junk_text, st.floats(allow_nan=False)]
    elif tp is str:
        if meta.get("choices"):
            options += [junk_text.filter(lambda t: t not in meta["choices"]), st.integers(), st.none(),
                        st.lists(st.sampled_from(meta["choices"]), min_size=1, max_size=2)]
        else:
            options += [st.integers(), st.none(), st.lists(junk_text, max_size=2)]
    elif tp in (int, float):
        options += [wrong_types.filter(lambda v: not (tp is float and isinstance(v, str) and _floaty(v))),
                    st.floats(allow_nan=True, allow_infinity=True).filter(
                        lambda v: tp is int or v != v or v in (float("inf"), float("-inf")))]
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None:
            below = st.integers(max_value=int(lo) - 1) if tp is int else st.floats(max_value=lo, exclude_max=True,
                                                                                     allow_nan=False)
            options.append(below)
            if meta.get("min_exclusive"):
                options.append(st.just(lo))
        if hi is not None:
            options.append(st.integers(min_value=int(hi) + 1) if tp is int else
                           st.floats(min_value=hi, exclude_min=not meta.get("max_exclusive"), allow_nan=False))
        if tp is float:
            options.append(huge_ints)  # an integer no float holds
        if meta.get("choices"):
            options.append(st.integers().filter(lambda v: v not in meta["choices"]))
    value = draw(st.one_of(options))
    return Case(f"bad value ({type(value).__name__})", dump(with_value(section, key, value)), (f"{section}.{key}",))


def _floaty(text: str) -> bool:
    try:
        return float(text) == float(text) and abs(float(text)) != float("inf")
    except ValueError:
        return False


LIST_BAD = {
    ("train", "betas"): st.one_of(st.lists(st.floats(0, 0.99), max_size=1), st.lists(st.floats(0, 0.99), min_size=3, max_size=4),
                                  st.tuples(st.booleans(), st.floats(0, 0.99)).map(list),
                                  st.tuples(st.floats(0, 0.99), st.floats(min_value=1.0, allow_nan=False)).map(list),
                                  st.tuples(junk_text, st.floats(0, 0.99)).map(list)),
    ("autoencoder", "widths"): st.one_of(st.just([]), st.lists(st.integers(max_value=0), min_size=1, max_size=3),
                                         st.lists(st.integers(4097, 10 ** 12), min_size=1, max_size=2),
                                         st.lists(st.integers(1, 64), min_size=9, max_size=12),
                                         st.lists(st.booleans(), min_size=1, max_size=2)),
    ("sweep", "seeds"): st.one_of(st.just([]), st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                                  st.lists(st.integers(min_value=SEED_MAX + 1), min_size=1, max_size=2),
                                  st.lists(st.booleans(), min_size=1, max_size=2), st.just([1, 1]),
                                  st.just(list(range(1001)))),
    ("sweep", "strategies"): st.one_of(st.just([]), st.just(["min_snr"]), st.just(["const", "const"]),
                                       st.lists(junk_text, min_size=1, max_size=2).map(lambda v: ["const", *v])),
    ("sweep", "targets"): st.one_of(st.just([]), st.just(["x0", "x0"]), st.lists(junk_text, min_size=1, max_size=2)),
}


@st.composite
def bad_list(draw) -> Case:
    (section, key), values = draw(st.sampled_from(sorted(LIST_BAD.items())))
    value = draw(st.one_of(values, wrong_types.filter(lambda v: not isinstance(v, list))))
    return Case("bad list", dump(with_value(section, key, value)), (f"{section}.{key}",))


CROSS_BAD = [  # (kind, changes, a key the refusal must name)
    ("batch not divisible by workers", {"train": {"num_workers": 3}}, "train.batch_size"),
    ("sampling steps beyond timesteps", {"diffusion": {"timesteps": 10}, "eval": {"sampling_steps": 11}}, "eval.sampling_steps"),
    ("eta with a non-ddim sampler", {"eval": {"eta": 0.5}}, "eval.eta"),
    ("downsample not dividing the image", {"data": {"image_size": 36}, "autoencoder": {"downsample": 8}}, "autoencoder.downsample"),
    ("patch not dividing the latent", {"model": {"patch_size": 3}}, "model.patch_size"),
    ("sweep eval after its last step", {"sweep": {"steps": 50, "eval_every": 60}}, "sweep.eval_every"),
    ("local cluster smaller than a run", {"ray": {"num_cpus": 1}}, "ray.num_cpus"),
    ("EMA that never moves", {"train": {"ema_decay": 1.0}}, "train.ema_decay"),
    ("batch larger than the dataset", {"train": {"batch_size": TRAIN_SET_SIZES["fashion_mnist"] + 64}}, "train.batch_size"),
    ("fp16 on CPU", {"train": {"precision": "fp16"}}, "train.precision"),
    ("sd-vae with the wrong downsampling", {"autoencoder": {"kind": "sd-vae"}}, "autoencoder.downsample"),
]


@st.composite
def bad_cross(draw) -> Case:
    kind, changes, key = draw(st.sampled_from(CROSS_BAD))
    raw = {s: dict(v) for s, v in BASE.items()}
    for section, values in changes.items():
        raw[section].update(values)
    return Case(kind, dump(raw), (key,))


@st.composite
def bad_structure(draw) -> Case:
    section = draw(st.sampled_from(sorted(SECTIONS)))
    raw = {s: dict(v) for s, v in BASE.items()}
    how = draw(st.sampled_from(["removed", "null", "scalar", "unknown key", "unknown section", "mixed keys",
                                "root list", "root scalar", "empty"]))
    if how == "removed":
        del raw[section]
    elif how == "null":
        raw[section] = None
    elif how == "scalar":
        raw[section] = draw(st.one_of(st.integers(), junk_text, st.lists(st.integers(), max_size=2)))
    elif how == "unknown key":
        raw[section][draw(junk_text.filter(lambda k: k not in FIELDS[section]))] = draw(st.integers())
    elif how == "unknown section":
        section = draw(junk_text.filter(lambda k: k not in SECTIONS))
        raw[section] = {"x": 1}
    elif how == "mixed keys":
        raw[section][draw(st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False)))] = 1
        raw[section]["zz_unknown"] = 2
    if how == "root list":
        return Case(how, dump([raw]), ("params",))
    if how == "root scalar":
        return Case(how, dump(draw(st.one_of(st.integers(), junk_text.filter(lambda t: not _yaml_is_mapping_or_null(t))))),
                    ("params",))
    if how == "empty":
        return Case(how, draw(st.sampled_from([b"", b"\n", b"# nothing\n", b"---\n", b"null\n", b"~\n"])), ("params",))
    return Case(f"section {how}", dump(raw), (section,))


def _yaml_is_mapping_or_null(text: str) -> bool:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return loaded is None or isinstance(loaded, dict)


@st.composite
def bad_bytes(draw) -> Case:
    text = dump(BASE)
    how = draw(st.sampled_from(["not utf-8", "binary", "duplicate key", "alias bomb", "syntax", "deep nesting",
                                "huge integer", "long digits", "huge list", "huge file"]))
    if how == "not utf-8":
        at = draw(st.integers(0, len(text)))
        data = text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80"])) + text[at:]
    elif how == "binary":
        data = draw(st.binary(min_size=1, max_size=200))
    elif how == "duplicate key":
        data = text + b"train:\n  steps: 5\n"
    elif how == "alias bomb":
        levels = draw(st.integers(3, 12))
        lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        lines += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(9))}]" for i in range(1, levels)]
        data = text + ("\n".join(lines) + "\n").encode()
    elif how == "syntax":
        data = text + draw(st.sampled_from([b"train: [1, 2\n", b"  bad indent: : :\n", b"key: 'unterminated\n",
                                            b"\t- tab\n", b"{\n"]))
    elif how == "deep nesting":
        depth = draw(st.integers(8, 3000))
        section, key = draw(st.sampled_from(SCALAR_FIELDS))
        raw = with_value(section, key, "X")
        data = dump(raw).replace(b"'X'", b"[" * depth + b"1" + b"]" * depth).replace(
            b": X\n", b": " + b"[" * depth + b"1" + b"]" * depth + b"\n")
    elif how == "huge integer":
        data = dump(with_value("train", "lr", 0.5)).replace(b"lr: 0.5", b"lr: " + b"9" * draw(st.integers(310, 4000)))
        return Case(how, data, ("train.lr",))
    elif how == "long digits":
        data = dump(with_value("train", "steps", 1)).replace(b"steps: 1\n", b"steps: " + b"7" * 5000 + b"\n")
    elif how == "huge list":
        return Case(how, dump(with_value("sweep", "seeds", list(range(draw(st.integers(1001, 3000)))))), ("sweep.seeds",))
    else:
        data = text + b"# " + b"x" * (1 << 20) + b"\n"
    return Case(how, data, ("params.yaml",))


GOOD_VALUES = [
    ("train", "steps", st.integers(0, 10 ** 6)), ("train", "lr", st.floats(1e-6, 1.0)),
    ("train", "seed", st.integers(0, SEED_MAX)), ("train", "ema_decay", st.floats(0.0, 0.9999)),
    ("train", "betas", st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)).map(list)),
    ("eval", "num_samples", st.integers(2, 10 ** 5)), ("eval", "sampler", st.sampled_from(["ddim", "ddpm", "dpmpp_2m"])),
    ("weighting", "strategy", st.sampled_from(["const", "min_snr", "learned", "dysigma", "dysigma_min_snr"])),
    ("autoencoder", "widths", st.lists(st.integers(1, 256), min_size=1, max_size=4)),
    ("sweep", "seeds", st.lists(st.integers(0, SEED_MAX), min_size=1, max_size=5, unique=True)),
    ("train", "batch_size", st.sampled_from([1, 2, 16, 64, 4096])), ("data", "download", st.booleans()),
]


@st.composite
def good(draw) -> Case:
    section, key, values = draw(st.sampled_from(GOOD_VALUES))
    return Case("valid value", dump(with_value(section, key, draw(values))), good=True)


any_case = st.one_of(bad_scalar(), bad_list(), bad_cross(), bad_structure(), bad_bytes(), good())


def classify(case: Case, path: Path) -> str:
    path.write_bytes(case.data)
    try:
        load_params(path)
    except ConfigError as e:
        if case.good:
            return "refused-good"
        msg = str(e)
        named = any(name in msg or repr(name) in msg for name in case.names) or str(path) in msg
        return "clear" if ("\n" not in msg and len(msg) <= 400 and named) else "unclear"
    except Exception:  # noqa: BLE001 - the point: anything else is a traceback for the user
        return "traceback"
    return "accepted" if case.good else "accepted-bad"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    from hypothesis import HealthCheck, given, settings

    tally: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"

        @settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(any_case)
        def run(case):
            outcome = classify(case, path)
            tally[outcome] += 1
            kinds[("good" if case.good else "bad", outcome)] += 1

        run()
    print(f"{sum(tally.values())} generated params files")
    print("| outcome | count |\n|---|---|")
    for outcome in ("clear", "accepted", "accepted-bad", "refused-good", "unclear", "traceback"):
        print(f"| {outcome} | {tally[outcome]} |")


if __name__ == "__main__":
    main()
