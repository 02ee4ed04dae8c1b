"""benchmarks/bench_vs_llamacpp.py without llama.cpp: its parsing (fixtures in llama.cpp's own output
formats), the environment it gives llama.cpp, the limits and ratios, and our side on a tiny model.
The llama.cpp build and the real run are never part of CI."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_vs_llamacpp as bv  # noqa: E402

# llama-bench -o jsonl (fields abridged; one line per test), between the log lines it prints
LLAMA_BENCH_OUT = """load_backend: loaded CPU backend from libggml-cpu.so
{"build_commit": "abc1234", "build_number": 11434, "model_filename": "SmolLM2.gguf", "n_threads": 2, "n_prompt": 64, "n_gen": 0, "n_depth": 0, "avg_ns": 131958000, "stddev_ns": 0, "avg_ts": 485.003, "stddev_ts": 0.0, "samples_ns": [ 131958000 ],"samples_ts": [ 485.003 ]}
{"build_commit": "abc1234", "build_number": 11434, "model_filename": "SmolLM2.gguf", "n_threads": 2, "n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ns": 663212000, "stddev_ns": 0, "avg_ts": 193.0, "stddev_ts": 0.0, "samples_ns": [ 663212000 ],"samples_ts": [ 193.0 ]}
"""

# llama-batched-bench --output-format jsonl, with its log lines around
BATCHED_OUT = """llama_context: n_ctx = 2048
main: n_kv_max = 2048, n_batch = 2048
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 32, "pl": 8, "n_kv": 512, "t_pp": 0.400000, "speed_pp": 640.000000, "t_tg": 0.768769, "speed_tg": 333.000000, "t": 1.168769, "speed": 438.060000}

llama_perf_context_print: total time = 1500 ms
"""


def test_parse_llama_bench_and_batched_bench():
    assert bv.parse_llama_bench(LLAMA_BENCH_OUT) == {("pp", 64): 485.003, ("tg", 128): 193.0}
    assert bv.parse_batched_bench(BATCHED_OUT) == {(32, 32, 8): 333.0}
    assert bv.llama_result("decode-b8", BATCHED_OUT) == 333.0
    assert bv.llama_result("decode-b1-tg128", LLAMA_BENCH_OUT) == 193.0
    assert bv.llama_result("prefill-64", LLAMA_BENCH_OUT) == 485.003
    with pytest.raises(KeyError):                   # a case the output does not hold is an error
        bv.llama_result("decode-b32", BATCHED_OUT)
    with pytest.raises(ValueError, match="no llama-bench result"):
        bv.parse_llama_bench("error: failed to load model\n")
    with pytest.raises(ValueError, match="no llama-batched-bench result"):
        bv.parse_batched_bench(LLAMA_BENCH_OUT)


def test_llama_commands_and_cases():
    bins = {t: f"/x/{t}" for t in bv.TARGETS}
    cmd = bv.llama_cmd("decode-b32", bins, "m.gguf", 2)
    assert cmd[0] == "/x/llama-batched-bench"
    assert cmd[cmd.index("-npl") + 1] == "32" and cmd[cmd.index("-t") + 1] == "2"
    assert int(cmd[cmd.index("-c") + 1]) >= 32 * (bv.DECODE_PP + bv.DECODE_TG)   # every sequence fits
    cmd = bv.llama_cmd("prefill-512", bins, "m.gguf", 3)
    assert cmd[0] == "/x/llama-bench" and cmd[cmd.index("-p") + 1] == "512" and cmd[cmd.index("-n") + 1] == "0"
    cmd = bv.llama_cmd("decode-b1-tg128", bins, "m.gguf", 3)
    assert cmd[cmd.index("-p") + 1] == "0" and cmd[cmd.index("-n") + 1] == "128"
    assert [bv.case_shape(c) for c in bv.CASES] == [("decode", 1), ("decode", 8), ("decode", 32), ("tg", 128),
                                                    ("prefill", 64), ("prefill", 512)]
    with pytest.raises(ValueError, match="unknown case"):
        bv.case_shape("decode")


def test_llama_cpp_does_not_inherit_our_wait_policy():
    user = {"PATH": "/usr/bin", "OMP_WAIT_POLICY": "PASSIVE", "MOPS_BACKEND": "cpu", "OMP_NUM_THREADS": "2"}
    env = bv.llama_env(user)
    assert env == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}


def test_limits_ratios_and_table():
    samples = {("decode-b8", "llama.cpp"): [300.0, 333.0, 340.0], ("decode-b8", "ours"): [200.0, 215.0, 250.0],
               ("prefill-64", "llama.cpp"): [480.0], ("prefill-64", "ours+mops"): [600.0]}
    rows = {(r["case"], r["provider"]): r for r in bv.summarize(samples, [40.0, 44.0, 50.0], 97_000_000)}
    r = rows[("decode-b8", "ours")]                                          # best rounds: 250 vs 340
    assert r["tok_s"] == 250.0 and r["tok_s_median"] == 215.0
    assert r["ratio_vs_llamacpp"] == pytest.approx(250.0 / 340.0)
    assert r["limit_tok_s"] == pytest.approx(8 * 50e9 / 97e6)             # B * best bandwidth / bytes
    assert r["pct_of_limit"] == pytest.approx(100 * 250.0 / (8 * 50e9 / 97e6))
    assert rows[("prefill-64", "ours+mops")]["limit_tok_s"] is None        # compute-bound: no limit
    assert rows[("prefill-64", "ours+mops")]["ratio_vs_llamacpp"] == pytest.approx(1.25)
    for r in rows.values():
        r["load"] = 1.5
    text = bv.table(list(rows.values()))
    line = next(ln for ln in text.splitlines() if ln.startswith("decode-b8"))
    assert "340.0" in line and "250.0" in line and "0.74" in line
    assert "prefill-64" in text and "decode-b1 " not in text


def test_ours_decode_and_prefill_on_a_tiny_int4_model():
    """Our side of the benchmark counts exactly the decode tokens it timed, with and without a mixture."""
    import mops_kernels
    from _hf_doubles import tiny_model
    from mops_kernels.modules.int4_linear import replace_linears
    model = tiny_model(layers=3)
    replace_linears(model.model)
    torch.manual_seed(0)
    mops = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=8, prompt_len=8, top_k=2,
                                                   gate_layer=0, inject_from=1)
    for m in (None, mops):
        ours = bv.Ours(model, m, model.config.vocab_size)
        assert ours.decode(3, 5, 4) > 0
        assert ours.run("decode-b1-tg128") > 0
        assert ours.prefill(11) > 0
        assert ours.decode(3, 5, 4) > 0                 # the engine is reused, its slots free again
