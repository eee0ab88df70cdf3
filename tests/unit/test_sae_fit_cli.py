"""`tti sae fit`'s activation flags: --activation, --l1-coefficient, --l0-coefficient and
--matryoshka-prefixes reach prepare_fit's sae_options; bad values and flags of another
activation are one-line errors with exit code 2, checked before the run is read."""

from __future__ import annotations

import argparse

import pytest


@pytest.mark.parametrize("args, message", [
    (["--activation", "gelu", "--k", "4"], "--activation: 'gelu'; allowed: topk, relu, batchtopk"),
    (["--activation", "batchtopk"], "--k: required with --activation batchtopk"),
    (["--k", "4", "--l0-coefficient", "0.1"], "--l0-coefficient: only used with --activation jumprelu"),
    (["--activation", "jumprelu", "--l0-coefficient", "abc"], "--l0-coefficient: 'abc' must be a finite number"),
    (["--activation", "relu", "--l1-coefficient", "-1"], "--l1-coefficient: '-1' must be a finite number >= 0"),
    (["--activation", "matryoshka", "--k", "4", "--matryoshka-prefixes", "16,x"],
     "--matryoshka-prefixes: '16,x' must be comma-separated integers"),
])
def test_bad_activation_flags_are_one_line_errors(tmp_path, capsys, args, message):
    from tti_dist.cli import main

    assert main(["sae", "fit", str(tmp_path), "--site", "blocks.1.resid_post", "--latents", "64", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tti: error: ") and message in err and "\n" not in err


def test_flags_become_sae_options():
    from tti_dist.cli import build_parser
    from tti_dist.commands.sae_fit import sae_options

    def parse(*args: str) -> argparse.Namespace:
        return build_parser().parse_args(["sae", "fit", "RUN", "--site", "s", "--latents", "64", *args])

    assert sae_options(parse("--k", "4")) == (4, {})
    assert sae_options(parse("--activation", "jumprelu", "--l0-coefficient", "2e-3")) == (32, {"l0_coefficient": 2e-3})
    assert sae_options(parse("--activation", "relu", "--l1-coefficient", "0.5")) == (32, {"l1_coefficient": 0.5})
    assert sae_options(parse("--activation", "matryoshka", "--k", "3", "--matryoshka-prefixes", "16,64")) == (
        3, {"matryoshka_prefixes": (16, 64)})


def test_prepare_fit_accepts_the_options():
    """The options are SAEConfig fields prepare_fit may set (FIT_OPTIONS), so they are not refused."""
    from tti_dist.commands.sae_fit import OPTION_FLAGS
    from tti_dist.sae.fit_plan import FIT_OPTIONS

    assert {field for field, _, _ in OPTION_FLAGS} <= set(FIT_OPTIONS)
