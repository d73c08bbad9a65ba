"""The option table: parsing, and the docs and CLI help generated from it."""
from __future__ import annotations

import os

import pytest
import torch

from tvm.contrib.torch import cli, options
from tvm.contrib.torch.dtypes import COMPUTE_DTYPES, SUPPORTED_DTYPES

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "docs", "README.md")


def test_docs_options_table_is_the_generated_one():
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    assert options.replace_docs_section(text) == text, \
        "docs/README.md's options table is stale: run scripts/update_options_docs.py"


def test_every_key_is_documented_once():
    names = [spec.name for spec in options.OPTIONS]
    assert len(names) == len(set(names))
    table = options.options_markdown()
    for name in names:
        assert f"| `{name}` |" in table
    assert set(options.PARTITION_KEYS) == {"min_block_size", "torch_executed_ops",
                                           "require_full_compilation", "dynamic_shapes"}


def test_cli_help_comes_from_the_table():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["compile"].format_help()
    for key in ("tuning_n_trials", "min_block_size", "require_full_compilation"):
        words = options.cli_help(key).split()[:4]
        assert " ".join(words) in " ".join(help_text.split())


def test_defaults():
    opts = options.parse_options({"input_infos": [("x", (2, 3))]})
    for spec in options.OPTIONS:
        if spec.parse is not None:
            assert getattr(opts, spec.name) == spec.default, spec.name
    assert opts.verify is True and opts.example_inputs is None
    assert not opts.tuning_log_explicit and opts.given == {"input_infos"}
    assert opts.buckets == [[options.InputInfo("x", (2, 3), "float32")]]


def test_verify_and_example_inputs():
    x = torch.rand(2, 3)
    opts = options.parse_options({"input_infos": [("x", (2, 3))], "verify": False,
                                  "example_inputs": [x]})
    assert opts.verify is False and opts.example_inputs == (x,)
    with pytest.raises(ValueError, match="verify must be a bool, got 1"):
        options.parse_options({"input_infos": [("x", (2, 3))], "verify": 1})
    with pytest.raises(ValueError, match="example_inputs must be a list or tuple of tensors"):
        options.parse_options({"input_infos": [("x", (2, 3))], "example_inputs": x})


@pytest.mark.parametrize("option, message", [
    ({"input_infos": [("x", (2,))], "device": "meta"}, r"device must be 'cpu'"),
    ({"input_infos": [("x", (2,))], "export_dir": 3}, r"export_dir must be a path"),
    ({"input_infos": [("x", (2,))], "tuning_log_file": b"x"}, r"tuning_log_file must be a path"),
    ({"input_infos": [("x", (2,))], "torch_executed_ops": "aten::relu"},
     r"torch_executed_ops must be a list of operator kinds"),
    ({"input_infos": [("x", (2,))], "dim_ranges": {"n": (0, 4)}},
     r"dim_ranges\['n'\] must be \(min, max\)"),
    ({"input_infos": [[("x", (2,))], [("y", (2,))]]}, r"bucket 1 has inputs \['y'\]"),
    ({"input_infos": [("x", (2,), "complex64")]}, r"unsupported dtype 'complex64'"),
])
def test_bad_values_name_the_key(option, message):
    with pytest.raises(ValueError, match=message):
        options.parse_options(option)


def test_floating_inputs_take_the_default_dtype():
    opts = options.parse_options({"input_infos": [("x", (2,), "float32"), ("i", (2,), "int64")],
                                  "default_dtype": "float16"})
    assert [i.dtype for i in opts.buckets[0]] == ["float16", "int64"]


def test_dtype_constants():
    assert set(COMPUTE_DTYPES) <= set(SUPPORTED_DTYPES)
    for name in SUPPORTED_DTYPES:
        assert isinstance(getattr(torch, name), torch.dtype)
