"""The decode-step profile: ops mapped back to the model's functions, and a real profile of a tiny model."""

from __future__ import annotations

import pathlib
import sys

import pytest

from batchgen.bench import profile_step

HLO = '''HloModule jit_decode

FileNames
1 "/x/model/transformer.py"
2 "/x/model/paged_attention.py"

FunctionNames
1 "logits"
2 "project"
3 "decode_attention"
4 "_decoder_layer"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=20 end_line=20 column=1 end_column=2}
3 {file_name_id=2 function_name_id=3 line=30 end_line=30 column=1 end_column=2}
4 {file_name_id=1 function_name_id=4 line=40 end_line=40 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=4 parent_frame_id=3}
4 {file_location_id=2 parent_frame_id=3}
5 {file_location_id=3 parent_frame_id=3}

ENTRY %main {
  %head = f32[64,49152]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="x" stack_frame_id=2}
  %qkv = f32[64,576]{1,0} fusion(%a, %c), kind=kCustom, metadata={op_name="y" stack_frame_id=4}
  %scores = f32[9,3]{1,0} fusion(%a, %d), kind=kLoop, metadata={op_name="z" stack_frame_id=5}
}
'''


def test_ops_are_grouped_by_the_model_function_that_emitted_them():
    stacks = profile_step._stack_functions(HLO)
    assert stacks["head"] == ["project", "logits"]
    groups = {name: profile_step._group(chain) for name, chain in stacks.items()}
    assert groups == {"head": "LM head", "qkv": "weight products", "scores": "attention over pages"}
    assert profile_step._group(["unknown"]) == "other"
    assert profile_step._group(["project.<locals>.xla_product"]) == "weight products"  # a nested function


@pytest.mark.slow
def test_profile_of_a_tiny_model_accounts_for_the_step(tmp_path):
    preset = str(pathlib.Path(__file__).parent / "fixtures" / "hf_llama2_tiny")
    result = profile_step.profile(profile_step.parse(["--preset", preset, "--slots", "8", "--context", "40"]))
    groups = result["groups_ms"]
    # On a model this small XLA fuses the head and sampling with other ops; the layers' groups are always there.
    assert {"weight products", "attention over pages", "KV cache writes"} <= set(groups), groups
    assert all(ms > 0 for ms in groups.values()) and result["step_ms"] > 0
    assert "step / weight products" in profile_step.render(result)
