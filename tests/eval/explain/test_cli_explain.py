"""`python -m eval SAE_DIR --explain N` offline, and the same command switched to an OpenAI-compatible
server (a fake one on 127.0.0.1) with no code change; `python -m eval.explain puzzles`."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.__main__ import main
from eval.explain.__main__ import main as explain_main
from sae.errors import UsageError


def data_dir_of(sae_dir):
    return str(sae_dir.parent.parent.parent / "data")


def test_offline_explain_scores_latents_neurons_and_shuffled_controls(embedded_sae_dir, tmp_path):
    jsonl = tmp_path / "units.jsonl"
    [report] = main([str(embedded_sae_dir), "--tokens", "4096", "--explain", "3", "--explain_out", str(jsonl),
                     "--simulators", "token-lookup,embedding", "--data_dir", data_dir_of(embedded_sae_dir)])
    section = report["explain"]
    assert section["explainer"] == "token-lookup" and section["primary_simulator"] == "embedding"
    for simulator in ("token-lookup", "embedding"):
        groups = section["simulators"][simulator]
        assert set(groups) == {"latents", "latents_shuffled", "neurons", "neurons_shuffled"}
        assert all(group["units"] == 3 for group in groups.values())
    assert section["mean_score_top_and_random"] == section["simulators"]["embedding"]["latents"]["mean_score_top_and_random"]
    units = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [unit["kind"] for unit in units] == ["latent"] * 3 + ["neuron"] * 3
    assert all(len(unit["excerpts"]["top"]) == 10 and len(unit["excerpts"]["top"][0]["tokens"]) == 63 for unit in units)
    # latents are drawn among those alive: each has a top excerpt where it fires
    assert all(unit["excerpts"]["top"][0]["activations"] and max(unit["excerpts"]["top"][0]["activations"]) > 0
               for unit in units[:3])


def test_latents_by_id_and_bad_ids(embedded_sae_dir, tmp_path):
    options = ["--tokens", "2048", "--simulators", "token-lookup", "--explain_neurons", "false",
               "--data_dir", data_dir_of(embedded_sae_dir), "--explain_out", str(tmp_path / "u.jsonl")]
    [report] = main([str(embedded_sae_dir), "--explain", "2", "--explain_latents", "7,300", *options])
    units = [json.loads(line)["unit"] for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert units == [7, 300] and set(report["explain"]["simulators"]["token-lookup"]) == {"latents", "latents_shuffled"}
    with pytest.raises(ValueError, match=r"latent ids \[5000\] are out of range"):
        main([str(embedded_sae_dir), "--explain", "1", "--explain_latents", "5000", *options])


class EchoServer:
    """An OpenAI-compatible server: chat completions return a fixed explanation; completions echo the
    prompt split at tabs, newlines and before spaces, with digit and " yes" / " no" logprobs at every token."""

    def __init__(self):
        self.paths = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.paths.append(self.path)
                if self.path.endswith("/chat/completions"):
                    reply = {"choices": [{"message": {"content": "words about files and paths."}}]}
                else:
                    pieces = [m for m in re.finditer(r"\t|\n| ?[^\t\n ]+| ", body["prompt"])]
                    tokens = [m.group() for m in pieces]
                    top = [None] + [{str(len(prev) % 11): -0.3, "0": -1.2, "10": -4.0, " yes": -0.2 - len(prev) % 3,
                                     " no": -1.0} for prev in tokens[:-1]]
                    reply = {"choices": [{"text": body["prompt"], "logprobs": {
                        "tokens": tokens, "top_logprobs": top, "text_offset": [m.start() for m in pieces]}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.httpd.shutdown()


def test_pointing_at_a_server_switches_to_the_llm_method(embedded_sae_dir, tmp_path, echo_server):
    args = [str(embedded_sae_dir), "--tokens", "2048", "--explain", "2", "--explain_neurons", "false",
            "--explainer_url", echo_server.url, "--explainer_model", "m", "--simulator_url", echo_server.url,
            "--simulator_model", "m", "--simulators", "llm,token-lookup", "--cache_dir", str(tmp_path / "cache"),
            "--explain_out", str(tmp_path / "u.jsonl"), "--data_dir", data_dir_of(embedded_sae_dir)]
    [report] = main(args)
    section = report["explain"]
    assert section["explainer"] == f"llm:http:m@{echo_server.url}" and section["primary_simulator"] == "llm"
    assert set(section["simulators"]) == {"llm", "token-lookup"}
    units = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert all(unit["explanation"] == "words about files and paths" for unit in units)
    assert all(-1 <= unit["scores"]["llm"]["top_and_random"] <= 1 for unit in units)
    assert echo_server.paths.count("/v1/chat/completions") == 2 and "/v1/completions" in echo_server.paths
    seen = len(echo_server.paths)
    [again] = main(args)  # the cache answers everything: a rerun costs nothing
    assert len(echo_server.paths) == seen and again["explain"]["simulators"] == section["simulators"]


def test_puzzles_command(embedded_sae_dir, tmp_path, capsys):
    out = tmp_path / "puzzles.json"
    report = explain_main(["puzzles", "--tokens", "4096", "--simulators", "token-lookup",
                           "--data_dir", data_dir_of(embedded_sae_dir), "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["puzzles"] >= 12
    result = report["simulators"]["token-lookup"]
    assert 0 <= result["true_is_best"] <= 1 and len(result["puzzles"]) == report["puzzles"]
    assert "true best" in capsys.readouterr().out
    with pytest.raises(UsageError, match="python -m eval.explain puzzles"):
        explain_main(["riddles"])


def test_n2g_is_a_fourth_offline_explainer_and_simulator(embedded_sae_dir, tmp_path):
    """--simulators ...,n2g adds each unit's N2G patterns, scored like the other explanations (correlation,
    shuffled control), for latents and neurons; alone it is the primary simulator."""
    jsonl = tmp_path / "units.jsonl"
    [report] = main([str(embedded_sae_dir), "--tokens", "2048", "--explain", "3", "--explain_out", str(jsonl),
                     "--simulators", "token-lookup,n2g", "--data_dir", data_dir_of(embedded_sae_dir)])
    groups = report["explain"]["simulators"]["n2g"]
    assert set(groups) == {"latents", "latents_shuffled", "neurons", "neurons_shuffled"}
    assert all(group["units"] == 3 for group in groups.values())
    assert report["explain"]["primary_simulator"] == "token-lookup"
    units = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert all("n2g" in unit["scores"] and "n2g" in unit["shuffled_scores"] and unit["n2g_explanation"] for unit in units)
    latent_means = groups["latents"]["mean_score_top_and_random"]
    assert latent_means == pytest.approx(sum(unit["scores"]["n2g"]["top_and_random"] for unit in units[:3]) / 3)
    [alone] = main([str(embedded_sae_dir), "--tokens", "2048", "--explain", "2", "--explain_neurons", "false",
                    "--simulators", "n2g", "--explain_out", str(tmp_path / "alone.jsonl"),
                    "--data_dir", data_dir_of(embedded_sae_dir)])
    assert alone["explain"]["primary_simulator"] == "n2g" and alone["explain"]["explainer"] == "token-lookup; n2g: its own patterns"
    assert set(alone["explain"]["simulators"]["n2g"]) == {"latents", "latents_shuffled"}  # the control without other simulators


def test_the_puzzles_refuse_n2g():
    with pytest.raises(UsageError, match="n2g simulates only its own patterns"):
        explain_main(["puzzles", "--simulators", "token-lookup,n2g"])
