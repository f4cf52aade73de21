"""Filter wiring: JSONL in, a stub policy samples, the reward router scores, kept JSONL + report out."""
import json

import pytest

from data.filters import FilterConfig
from data.prompts import PromptRecord, load_prompts, write_prompts
from rl.filter_prompts import filter_prompt_file
from rl.rewards.base import BaseScorer, RewardResult
from rl.rewards.router import RewardRouter, RouterConfig


class ExactMatch(BaseScorer):
    def score(self, sample):
        ok = sample.response.strip() == sample.reference
        return RewardResult(float(ok), ok, "ok" if ok else "wrong")


class LengthScore(BaseScorer):
    """A stand-in reward model: longer answers score higher."""

    def score(self, sample):
        return RewardResult(len(sample.response) / 10, False, "rm")


def stub_policy(records, n):
    """'easy' prompts: always right; 'mixed': right every other sample; 'hard': never; chat: same or varied text."""
    out = []
    for r in records:
        kind = r.metadata["kind"]
        if kind == "easy":
            out.append([r.reference_answer] * n)
        elif kind == "mixed":
            out.append([r.reference_answer if i % 2 == 0 else "nope" for i in range(n)])
        elif kind == "hard":
            out.append(["nope"] * n)
        elif kind == "flat":
            out.append(["same answer"] * n)
        else:
            out.append(["x" * (i + 1) for i in range(n)])
    return out


@pytest.fixture
def prompt_file(tmp_path):
    records = [PromptRecord(f"m{i}", "math", f"q{i}", reference_answer=str(i), metadata={"kind": k})
               for i, k in enumerate(["easy", "mixed", "hard", "mixed"])]
    records += [PromptRecord("c0", "chat", "write", metadata={"kind": "flat"}),
                PromptRecord("c1", "chat", "write more", metadata={"kind": "varied"})]
    path = tmp_path / "prompts.jsonl"
    write_prompts(records, path)
    with open(path, "a") as f:
        f.write('{"id": "bad", "domain": "math"}\n')  # no prompt: reported and skipped
    return path


def test_filter_writes_kept_prompts_and_report(prompt_file, tmp_path):
    router = RewardRouter({"math": ExactMatch(), "pairwise": LengthScore()}, RouterConfig(progress=False))
    out = tmp_path / "kept.jsonl"
    report, loaded = filter_prompt_file(prompt_file, out, stub_policy, router, n=4,
                                        cfg=FilterConfig(hard_pass_rate=0.0), batch_prompts=4)
    kept, _ = load_prompts(out)
    assert [r.id for r in kept] == ["m1", "m3", "c1"]
    assert kept[0].reference_answer == "1" and kept[0].metadata == {"kind": "mixed"}  # records pass through unchanged
    summary = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    assert summary["per_domain"]["math"] == {"kept": 2, "too_easy": 1, "too_hard": 1, "low_variance": 0}
    assert summary["per_domain"]["chat"] == {"kept": 1, "too_easy": 0, "too_hard": 0, "low_variance": 1}
    assert summary["total"]["kept"] == 3 and len(summary["bad_records"]) == 1 and "prompt" in summary["bad_records"][0]
    by_id = {p["id"]: p for p in summary["prompts"]}
    assert by_id["m1"]["pass_rate"] == 0.5 and by_id["c0"]["reason"] == "low_variance"
    assert report.total() == 6 and loaded.num_bad == 1


def test_policy_returning_too_few_responses_is_named(prompt_file, tmp_path):
    router = RewardRouter({"math": ExactMatch(), "pairwise": LengthScore()}, RouterConfig(progress=False))
    with pytest.raises(ValueError, match="4 responses for every prompt"):
        filter_prompt_file(prompt_file, tmp_path / "k.jsonl", lambda recs, n: [["a"]] * len(recs), router, n=4)


@pytest.mark.timeout(120)
def test_filter_command_end_to_end(tmp_path):
    """The CLI on a fresh tiny model: nothing it samples is right, so hard_pass_rate=0 drops every verifiable prompt."""
    from data.tasks import generate_prompts
    from megatron_seed.cli import main

    src = tmp_path / "p.jsonl"
    write_prompts(generate_prompts(3, families=("arithmetic",)), src)
    out = tmp_path / "kept.jsonl"
    assert main(["filter", "--input", str(src), "--output", str(out), "-n", "2", "--hard-pass-rate", "0",
                 "--set", "rollout.max_new_tokens=4"]) == 0
    summary = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    assert summary["total"]["too_hard"] + summary["total"]["kept"] == 3 and summary["samples_per_prompt"] == 2
    assert len(load_prompts(out)[0]) == summary["total"]["kept"]


@pytest.mark.timeout(240)
def test_filter_command_refuses_unscorable_prompts_and_judges_with_the_policy(tmp_path, capsys):
    """A chat prompt with no reward model is refused before sampling, naming the fix; with rewards.llm_judge=policy
    the sampled policy judges the STEM prompt's answers itself."""
    from megatron_seed.cli import main

    chat = tmp_path / "chat.jsonl"
    write_prompts([PromptRecord("c0", "chat", "Write a haiku.")], chat)
    assert main(["filter", "--input", str(chat), "--output", str(tmp_path / "k0.jsonl"), "-n", "2"]) == 2
    assert "route to 'pairwise'" in capsys.readouterr().err and not (tmp_path / "k0.jsonl").exists()
    stem = tmp_path / "stem.jsonl"
    write_prompts([PromptRecord("s0", "stem", "Why is the sky blue?", reference_answer="Rayleigh scattering")], stem)
    out = tmp_path / "k1.jsonl"
    assert main(["filter", "--input", str(stem), "--output", str(out), "-n", "2", "--set", "rollout.max_new_tokens=4",
                 "--set", "rewards.llm_judge=policy"]) == 0
    summary = json.loads((tmp_path / "k1.jsonl.report.json").read_text())
    assert summary["total"]["kept"] + summary["total"]["too_hard"] == 1
