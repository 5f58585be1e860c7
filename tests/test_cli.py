"""`routereplay generate`: offline generation from the command line, routing reported and stored."""

import ast
import json

import numpy as np
import pytest

from routereplay.cli import main
from routereplay.store import open as open_store
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("cli_ckpts")), "qwen3_moe")


def test_generate_prints_text_and_routing_shape(qwen, capsys):
    assert main(["generate", "--model", qwen, "--max-tokens", "5", "hello", "abc"]) == 0
    out = capsys.readouterr().out
    assert out.count("completion: ") == 2
    # "hello" is 5 characters (one token each) + 5 generated -> 9 rows; 2 MoE layers of top-2
    assert "routed_experts: uint8[9, 2, 2]" in out and "routed_experts: uint8[7, 2, 2]" in out


def test_generate_stop_string_ends_the_completion(qwen, capsys):
    assert main(["generate", "--model", qwen, "--max-tokens", "12", "hello"]) == 0
    free = capsys.readouterr().out
    text = ast.literal_eval(free.split("completion: ")[1].split(" (")[0])  # the printed repr
    stop = text[4:6]
    assert main(["generate", "--model", qwen, "--max-tokens", "12", "--stop", stop, "hello"]) == 0
    out = capsys.readouterr().out
    assert f"completion: {text[: text.find(stop)]!r} (" in out and ", stop)" in out


def test_generate_stores_routing_under_request_ids(qwen, tmp_path, capsys):
    rr = json.dumps({"enable": True, "store": "local", "local_store_dir": str(tmp_path / "routing")})
    assert main(["generate", "--model", qwen, "--max-tokens", "3", "--routing-replay", rr, "xyz"]) == 0
    store = open_store(str(tmp_path / "routing"))
    (key,) = store.keys()
    assert f"stored as {key!r}" in capsys.readouterr().out
    assert store.get(key).shape == (5, 2, 2) and store.get(key).dtype == np.uint8


def test_generate_bad_input_exits_with_the_field(qwen, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", qwen, "--max-tokens", "0", "hello"])
    assert e.value.code == 2 and "max_tokens" in capsys.readouterr().err
