"""`tilevlm bench --peer llama.cpp`: the command lines, the parsing of llama.cpp's output (real
output of llama-bench and llama-mtmd-cli, trimmed), the stand-in tokenizer, the converter's
workarounds, and the whole comparison against a fake llama.cpp checkout (scripts standing in for
the converter, gguf-py and the binaries) on a tiny Idefics3-shaped model. No llama.cpp needed,
no timing asserts."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from helpers import assert_refused, run_tilevlm
from tilevlm.bench import peer_llama_cpp as peer
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.gguf_files import stand_in_tokenizer
from tilevlm.cli import main
from tilevlm.config import PRESETS
from tilevlm.special_tokens import smolvlm_token_ids

# smolvlm_256m's mechanism at tiny widths (as tests/test_bench_peer_transformers.py's)
TINY = dict(vit_img_size=32, vit_patch_size=8, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2,
            vit_n_blocks=1, lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2,
            lm_n_blocks=2, lm_base_vocab_size=300, lm_vocab_size=340, lm_image_token_id=338,
            mp_pixel_shuffle_factor=2, mp_image_token_length=4, max_img_size=128,
            lm_max_position_embeddings=1024, lm_max_length=1024)

# llama-bench -o json (build 0c1e570), two tests of one model, fields trimmed
LLAMA_BENCH_JSON = """[
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
   "model_filename": "/w/text-q4_0.gguf", "model_type": "llama 256M Q4_0", "n_threads": 1,
   "n_prompt": 16, "n_gen": 0, "n_depth": 0, "avg_ns": 73477425, "avg_ts": 217.753956},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
   "model_filename": "/w/text-q4_0.gguf", "model_type": "llama 256M Q4_0", "n_threads": 1,
   "n_prompt": 0, "n_gen": 8, "n_depth": 0, "avg_ns": 98000000, "avg_ts": 81.5}
]"""

# llama-mtmd-cli -lv 4 --perf on one 512x512 image (5 slices), lines trimmed
MTMD_LOG = """0.01.086.041 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 11)
0.06.211.339 I mtmd batch encoding done in 5126 ms
0.06.211.409 I decoding image batch 1/1, n_tokens_batch = 64
0.06.569.149 I image decoded (batch 1/1) in 357 ms
0.11.334.637 I mtmd batch encoding done in 4710 ms
0.11.740.970 I image decoded (batch 1/1) in 405 ms
0.29.500.244 I llama_perf_context_print:        load time =     418.19 ms
0.29.500.248 I llama_perf_context_print: prompt eval time =   28429.93 ms /   348 tokens (   81.70 ms per token,    12.24 tokens per second)
0.29.500.249 I llama_perf_context_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
"""


def test_llama_bench_output_is_read_per_test():
    rows = peer.parse_llama_bench(LLAMA_BENCH_JSON)
    assert [(r["model"], r["test"], r["tokens"]) for r in rows] == [
        ("text-q4_0.gguf", "prompt", 16), ("text-q4_0.gguf", "decode", 8)]
    assert rows[1]["tokens_per_s"] == 81.5 and rows[0]["build"] == "0c1e570 (build 1)"
    with pytest.raises(ChildProcessError, match="no JSON"):
        peer.parse_llama_bench("| model | size |")


def test_mtmd_time_to_first_token_spans_the_prompt_phase():
    parsed = peer.parse_mtmd(MTMD_LOG)
    assert parsed == {"time_to_first_token_s": pytest.approx(28.42993), "prompt_tokens": 348,
                      "image_encode_ms": 5126 + 4710, "image_decode_ms": 357 + 405}
    # a build whose prompt eval time leaves the encoding out (shorter than it): added back
    short = MTMD_LOG.replace("28429.93 ms", "900.00 ms")
    assert peer.parse_mtmd(short)["time_to_first_token_s"] == pytest.approx(0.9 + 9.836)
    with pytest.raises(ChildProcessError, match="timings"):
        peer.parse_mtmd("llama_perf_context_print: load time = 1 ms")


def test_the_command_lines():
    bins = Path("/b")
    command = peer.llama_bench_command(bins, [Path("a.gguf"), Path("b.gguf")], 2, 512, 64)
    assert command == ["/b/llama-bench", "-m", "a.gguf", "-m", "b.gguf", "-p", "512", "-n", "64",
                       "-t", "2", "-r", "1", "-o", "json"]
    mtmd = peer.mtmd_command(bins, Path("t.gguf"), Path("m.gguf"), Path("i.png"), 2)
    assert mtmd[:9] == ["/b/llama-mtmd-cli", "-m", "t.gguf", "--mmproj", "m.gguf", "--image",
                        "i.png", "-p", peer.IMAGE_PROMPT]
    assert ["-n", "1"] == mtmd[9:11] and "--perf" in mtmd and "smolvlm" in mtmd


def test_a_decode_step_reads_the_output_matrix_not_the_input_embedding():
    untied = {"token_embd.weight": 100, "output.weight": 60, "blk.0.attn_q.weight": 7}
    assert peer.gguf_step_bytes(untied) == 67
    tied = {"token_embd.weight": 100, "blk.0.attn_q.weight": 7}
    assert peer.gguf_step_bytes(tied) == 107


def test_the_stand_in_tokenizer_has_smolvlms_ids(tmp_path):
    cfg = BenchConfig(preset="smolvlm_256m", overrides=TINY).model_config()
    tok = stand_in_tokenizer(cfg, tmp_path)
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    assert len(vocab) == cfg.lm_vocab_size == max(vocab.values()) + 1
    for token, token_id in smolvlm_token_ids(cfg.lm_base_vocab_size).items():
        assert vocab[token] == token_id
    assert tok.eos_token == "<end_of_utterance>" and vocab["<end_of_utterance>"] == 339
    assert len(tok.encode("\n\n")) == 1 and len(tok.encode("\n")) == 1  # llama.cpp looks both up
    assert tok.decode(tok.encode("Describe this image.")) == "Describe this image."


# ----------------------------------------------------------------------------- the CLI

def _checkout(root: Path, binaries: tuple[str, ...] = ()) -> Path:
    (root / "gguf-py").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text("")
    (root / "build" / "bin").mkdir(parents=True)
    for name in binaries:
        (root / "build" / "bin" / name).write_text("")
    return root


def test_a_missing_binary_is_one_line_saying_what_to_build(tmp_path):
    source = _checkout(tmp_path / "llama.cpp", binaries=("llama-bench",))
    done = run_tilevlm("bench", "--preset", "smolvlm_256m", "--peer", "llama.cpp",
                       "--llama-cpp", source, "--parts", "decode", timeout=120)
    assert_refused(done, "bench", "no llama-mtmd-cli, llama-quantize in", "cmake --build",
                   "--target llama-bench llama-mtmd-cli llama-quantize")


def test_what_the_peer_needs_is_checked_first(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a llama.cpp source checkout"):
        peer.check_llama_cpp(tmp_path)
    source = _checkout(tmp_path / "llama.cpp", binaries=peer.BINARIES)
    with pytest.raises(ValueError, match="no llama-bench, llama-mtmd-cli, llama-quantize in"):
        peer.check_llama_cpp(source, tmp_path)  # --llama-cpp-bin elsewhere
    monkeypatch.setattr(peer, "CONVERTER_NEEDS", ("numpy", "no_such_module_here"))
    with pytest.raises(ValueError, match="needs no_such_module_here .pip install"):
        peer.check_llama_cpp(source)
    monkeypatch.setattr(peer, "CONVERTER_NEEDS", ("numpy",))
    peer.check_llama_cpp(source)  # everything there
    for bad, message in ((dict(), "needs --llama-cpp DIR"),
                         (dict(llama_cpp=str(source), peer="transformers"), "are for --peer"),
                         (dict(llama_cpp=str(source), baseline=True), "drop --baseline")):
        fields = {"preset": "smolvlm_256m", "peer": "llama.cpp", **bad}
        with pytest.raises(ValueError, match=message):
            BenchConfig(**fields).validate()



# ----------------------------------------------------------------------------- a fake llama.cpp

FAKE_CONVERTER = '''
import json, pathlib, sys
from conversion.base import TextModel
args = sys.argv[1:]
config = json.loads((pathlib.Path(args[0]) / "config.json").read_text())
# what the bench's workaround makes of an unknown pre-tokenizer, and the architecture the
# export names, noted beside this script (the bench's work directory goes at its end)
record = {"pre": TextModel().get_vocab_base_pre(None),
          "arch": config["text_config"]["architectures"], "args": args}
with open(pathlib.Path(__file__).with_name("converted.jsonl"), "a") as log:
    log.write(json.dumps(record) + "\\n")
open(args[args.index("--outfile") + 1], "w").write("gguf")
'''
FAKE_BASE = '''
class TextModel:
    def get_vocab_base_pre(self, tokenizer):
        raise NotImplementedError("BPE pre-tokenizer was not recognized")
'''
FAKE_GGUF = '''
class _T:
    def __init__(self, name, n):
        self.name, self.n_bytes = name, n
class GGUFReader:
    def __init__(self, path):
        self.tensors = [_T("token_embd.weight", 1000), _T("output.weight", 400),
                        _T("blk.0.ffn_up.weight", 600)]
'''
FAKE_BENCH = '''
import json, sys
args = sys.argv[1:]
models = [args[i + 1] for i, a in enumerate(args) if a == "-m"]
p, n = int(args[args.index("-p") + 1]), int(args[args.index("-n") + 1])
rows = []
for m in models:
    rate = 100.0 + len(m) % 7
    if p:
        rows.append({"build_commit": "fake", "build_number": 7, "model_filename": m,
                     "n_prompt": p, "n_gen": 0, "n_threads": 1, "avg_ts": 10 * rate})
    if n:
        rows.append({"build_commit": "fake", "build_number": 7, "model_filename": m,
                     "n_prompt": 0, "n_gen": n, "n_threads": 1, "avg_ts": rate})
print(json.dumps(rows))
'''
FAKE_MTMD = '''
import sys
sys.stderr.write("I mtmd batch encoding done in 300 ms\\nI image decoded (batch 1/1) in 20 ms\\n"
                 "I llama_perf_context_print: prompt eval time =   500.00 ms /    99 tokens\\n")
'''
FAKE_QUANTIZE = '''
import shutil, sys
shutil.copy(sys.argv[1], sys.argv[2])
'''


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_llama_cpp(root: Path) -> Path:
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text(FAKE_BASE)
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "gguf-py" / "gguf" / "__init__.py").write_text(FAKE_GGUF)
    bins = root / "build" / "bin"
    bins.mkdir(parents=True)
    for name, body in (("llama-bench", FAKE_BENCH), ("llama-mtmd-cli", FAKE_MTMD),
                       ("llama-quantize", FAKE_QUANTIZE)):
        _script(bins / name, body)
    return root


def test_the_comparison_against_a_fake_llama_cpp(tmp_path, capsys, monkeypatch):
    source = _fake_llama_cpp(tmp_path / "llama.cpp")
    monkeypatch.setitem(PRESETS, "tiny_idefics3", {**PRESETS["smolvlm_256m"], **TINY})
    monkeypatch.setattr(peer, "CONVERTER_NEEDS", ("numpy",))  # sentencepiece: the converter's
    out = tmp_path / "peer.json"
    code = main(["bench", "--preset", "tiny_idefics3", "--peer", "llama.cpp", "--llama-cpp",
                 str(source), "--parts", "prefill", "decode", "--repeats", "1", "--warmup", "1",
                 "--decode-tokens", "5", "--decode-batches", "1", "2", "--threads", "1",
                 "--json", str(out)])
    assert code == 0
    converted = [json.loads(line) for line in (source / "converted.jsonl").read_text().splitlines()]
    assert all(c["pre"] == "gpt-2" and c["arch"] == ["VLlama3ForCausalLM"] for c in converted)
    assert sorted(c["args"][2] for c in converted) == ["bf16", "f16", "f32", "f32", "q8_0"]
    assert sum("--mmproj" in c["args"] for c in converted) == 2
    table = capsys.readouterr().out
    data = json.loads(out.read_text())["peer"]
    assert data["build"] == "fake (build 7)" and data["rounds"] == 1
    rows = {(r["workload"], r["tilevlm"]): r for r in data["comparisons"]}
    for fmt in ("fp32", "bf16", "int8", "int4"):
        for workload in ("decode_b1", "prompt"):
            row = rows[(workload, fmt)]
            assert row["llama.cpp"] == peer.GGUF_TYPE[fmt]
            assert row["ratio"] == pytest.approx(row["tilevlm_value"] / row["llama_cpp_value"])
            best = max(data["figures"]["tilevlm"][fmt][workload]["runs"])
            assert row["ratio_of_best_runs"] == pytest.approx(best / row["llama_cpp_value"])
            assert f"{row['ratio']:.2f}x" in table
        llama = data["figures"]["llama.cpp"][fmt]["decode_b1"]
        assert len(llama["runs"]) == 1  # the warm-up round is not counted
        assert data["figures"]["tilevlm"][fmt]["decode_b2"]["median"] > 0
    ttft = rows[("image_ttft", "bf16")]
    assert ttft["llama.cpp"] == "bf16 + mmproj f16" and ttft["llama_cpp_value"] == 0.5
    assert ttft["ratio"] == pytest.approx(0.5 / ttft["tilevlm_value"])
    assert ("image_ttft", "int8") not in rows  # llama-mtmd-cli's pairs: f32 and bf16
    # the bound: the fake GGUF's step reads the output matrix and the block, not the embedding
    assert data["step_bytes"]["llama.cpp"]["fp32"] == 1000
    decode = rows[("decode_b1", "int4")]
    bound = data["bandwidth_gbps"] * 1e9 / 1000
    assert decode["llama_cpp_bound_fraction"] == pytest.approx(decode["llama_cpp_value"] / bound)
    assert "memory bandwidth" in table and "of the bandwidth bound" in table
    assert "tilevlm int4 decode, batch 2" in table
    assert data["image_prompt_tokens"]["llama.cpp"] == 99
