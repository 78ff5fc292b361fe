"""Every user mistake on the command line ends in one line on stderr (`rcpp-hf <command>: error: ...`) and exit status
2, with no traceback; `--debug` or RCPP_HF_DEBUG=1 shows the traceback instead, and a bug always does.

The mistakes are caught before any model loads, so these tests load none.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import httpx

from rcpp_hf.benchmark.suite import BenchmarkSettings, known_methods
from rcpp_hf.cli import main
from rcpp_hf.cli.errors import UsageError, run_script
from rcpp_hf.eval.harness import EvalItem, check_images_readable
from rcpp_hf.methods import METHODS, method_config
from rcpp_hf.shapesworld.pope_sets import pope_scenes
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED
from tests.cli_helpers import user_error
from tests.conftest import make_images
from tests.eval_helpers import two_image_annotations, write_mme

REPO = Path(__file__).resolve().parents[1]
CONTRASTIVE_WITH_RCPP = ("vcd+rcpp", "sid+rcpp", "plausibility_cutoff+rcpp")


# --- --model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "./no-such-checkpoint", "runs/no/such/checkpoint"])
def test_a_model_path_that_does_not_exist_is_named(capsys, model):
    user_error(capsys, ["generate", "--model", model], f"^rcpp-hf generate: error: --model {model}: folder does not "
               "exist; pass a checkpoint folder, a hub id \\(org/name\\) or shapesworld-smol")  # fmt: skip


def test_a_model_folder_without_a_checkpoint_and_a_model_file_are_refused(capsys, tmp_path):
    user_error(capsys, ["generate", "--model", str(tmp_path)], "--model .*: not a checkpoint folder \\(no config.json")
    (tmp_path / "weights.bin").write_bytes(b"")
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path), "--output-dir", str(tmp_path / "run"),
                        "--model", str(tmp_path / "weights.bin")],
               "^rcpp-hf eval mme: error: --model .*weights.bin: is a file, not a checkpoint folder")  # fmt: skip


NO_SUCH_ID = "rcpp-hf-tests/no-such-model"
FIXTURE_POPE = REPO / "tests" / "fixtures" / "pope" / "coco_pope_random.json"


def commands_with_a_model(tmp_path: Path) -> dict[str, list[str]]:
    """Every command that takes --model, with the other arguments it requires."""
    run = ["--output-dir", str(tmp_path / "run")]
    return {
        "generate": ["generate"],
        "bench": ["bench"],
        "demo": ["demo"],
        "eval pope": ["eval", "pope", "--question-file", str(FIXTURE_POPE), "--image-folder", str(tmp_path), *run],
        "eval chair": ["eval", "chair", "--image-folder", str(tmp_path), "--annotations", str(tmp_path), *run],
        "eval mme": ["eval", "mme", "--mme-root", str(tmp_path), *run],
        "eval shapesworld": ["eval", "shapesworld", "--split", "random", *run],
        "shapesworld compare": ["shapesworld", "compare", *run],
        "gan-pruner train": ["gan-pruner", "train", *run],
        "gan-pruner match": ["gan-pruner", "match", "--pruners", str(tmp_path), *run],
    }


def test_every_command_refuses_a_hub_id_it_cannot_load_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    for name, argv in commands_with_a_model(tmp_path).items():
        user_error(capsys, [*argv, "--model", NO_SUCH_ID],
                   f"^rcpp-hf {name}: error: --model {NO_SUCH_ID}: could not be loaded from the hub or a local folder "
                   r"\(it is not in the local hub cache, and HF_HUB_OFFLINE=1 forbids downloading it\); check the id, "
                   "unset HF_HUB_OFFLINE to download it, or pass a local checkpoint folder$")  # fmt: skip


def hub_failure(monkeypatch, cause: Exception) -> None:
    """transformers' OSError over `cause` when --model's config.json is fetched: the hub's answer, without a network."""

    def fetch(model_id, filename, **kwargs):
        raise OSError(f"{model_id}: transformers' own multi-line message\nsecond line") from cause

    monkeypatch.setattr("rcpp_hf.cli.options.cached_file", fetch)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def hub_response(status: int):
    request = httpx.Request("HEAD", f"https://huggingface.co/{NO_SUCH_ID}/resolve/main/config.json")
    return httpx.Response(status, request=request)


def test_a_hub_id_that_does_not_exist_or_cannot_be_reached_is_one_line(capsys, tmp_path, monkeypatch):
    hub_failure(monkeypatch, RepositoryNotFoundError("404 Repository Not Found", response=hub_response(404)))
    user_error(capsys, ["generate", "--model", NO_SUCH_ID], f"^rcpp-hf generate: error: --model {NO_SUCH_ID}: could "
               r"not be loaded from the hub or a local folder \(the hub has no model of that id, or it is private\); "
               r"check the id \(org/name\), log in \(hf auth login\) for a private model, or pass a local checkpoint "
               "folder$")  # fmt: skip
    hub_failure(monkeypatch, LocalEntryNotFoundError("cannot connect"))
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path), "--output-dir", str(tmp_path / "run"), "--model",
                        NO_SUCH_ID],
               r"^rcpp-hf eval mme: error: --model .*: could not be loaded from the hub or a local folder \(the hub "
               r"could not be reached and it is not in the local hub cache\); check the id and the network, pass a "
               "local checkpoint folder, or set HF_HUB_OFFLINE=1 to use a copy already in the local hub cache$")
    hub_failure(monkeypatch, GatedRepoError("403 gated", response=hub_response(403)))
    user_error(capsys, ["bench", "--model", NO_SUCH_ID], r"\(it is a gated model\); request access at "
               f"https://huggingface.co/{NO_SUCH_ID} and log in \\(hf auth login\\), or pass a local folder$")  # fmt: skip


def test_a_later_hub_failure_is_one_line_and_other_os_errors_keep_their_traceback(capsys, monkeypatch, tmp_path):
    def weights_unreachable(runs, reference=None):  # e.g. the config was cached, the weights are not and the hub is unreachable
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.") \
            from LocalEntryNotFoundError("cannot connect")  # fmt: skip

    monkeypatch.setattr("rcpp_hf.cli.report.write_report", weights_unreachable)
    user_error(capsys, ["report", str(tmp_path)], "^rcpp-hf report: error: could not be loaded from the hub or a local "
               "folder: We couldn't connect to 'https://huggingface.co' to load the files.; check the id and the "
               "network, pass a local checkpoint folder, or set HF_HUB_OFFLINE=1")  # fmt: skip

    def disk_full(runs, reference=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rcpp_hf.cli.report.write_report", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["report", str(tmp_path)])


def test_the_studies_refuse_a_model_in_one_line(capsys, monkeypatch, tmp_path):
    from experiments import condensation, defaults_sweep, head_ablation

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for study in (condensation, defaults_sweep, head_ablation):
        prog = f"python experiments/{study.__name__.split('.')[-1]}.py"
        monkeypatch.setattr(sys, "argv", [prog, "--model", NO_SUCH_ID, "--output-dir", str(tmp_path)])
        capsys.readouterr()
        assert run_script(study.main, prog) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"{prog}: error: --model {NO_SUCH_ID}: could not be loaded from the hub or a local folder (it "
                         "is not in the local hub cache, and HF_HUB_OFFLINE=1 forbids downloading it); check the id, "
                         "unset HF_HUB_OFFLINE to download it, or pass a local checkpoint folder"]  # fmt: skip


# --- --device --------------------------------------------------------------------------------------------------


def test_a_device_this_machine_lacks_is_refused_naming_those_it_has(capsys, tmp_path):
    devices = "cpu" + (", cuda" if torch.cuda.is_available() else "")
    user_error(capsys, ["generate", "--device", "cuda:99"],
               f"^rcpp-hf generate: error: --device cuda:99: not available on this machine; available here: {devices}")
    user_error(capsys, ["bench", "--shape", "tiny", "--device", "cuda:99"], "^rcpp-hf bench: error: --device cuda:99")
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path), "--output-dir", str(tmp_path / "run"),
                        "--device", "cuda:99"], "^rcpp-hf eval mme: error: --device cuda:99: not available")
    user_error(capsys, ["generate", "--device", "gpu"], "--device gpu: not a device name; available here: cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    user_error(capsys, ["generate", "--device", "cuda"], "--device cuda: not available on this machine; "
               "available here: cpu$")  # fmt: skip


# --- --image ---------------------------------------------------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    """The first half of a JPEG: its header opens and verifies, its pixels do not decode."""
    buffer = io.BytesIO()
    make_images(1)[0].resize((64, 64)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path



def test_an_image_that_is_not_an_image_or_not_there_is_named(capsys, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    user_error(capsys, ["generate", "--image", str(text)],
               "^rcpp-hf generate: error: --image .*notes.png: not an image file PIL can read")
    user_error(capsys, ["generate", "--image", str(tmp_path / "nope.png")], "image file not found: .*nope.png")
    truncated_jpeg(tmp_path / "truncated.jpg")
    user_error(capsys, ["generate", "--image", str(tmp_path / "truncated.jpg")], r"^rcpp-hf generate: error: --image "
               r".*truncated.jpg: a damaged image PIL cannot read \(image file is truncated.*\); pass a PNG, JPEG")


# --- counts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_below_one_is_refused(capsys, tmp_path, value):
    expected = f"error: --max-new-tokens {value}: must be at least 1$"
    user_error(capsys, ["generate", "--max-new-tokens", value], "^rcpp-hf generate: " + expected)
    user_error(capsys, ["demo", "--max-new-tokens", value], "^rcpp-hf demo: " + expected)
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path), "--output-dir", str(tmp_path / "run"),
                        "--max-new-tokens", value], "^rcpp-hf eval mme: " + expected)  # fmt: skip
    user_error(capsys, ["eval", "shapesworld", "--split", "random", "--output-dir", str(tmp_path / "run"),
                        "--max-new-tokens", value], "^rcpp-hf eval shapesworld: " + expected)  # fmt: skip


# --- methods and configs ---------------------------------------------------------------------------------------


def test_an_unknown_method_and_invalid_settings_are_one_line(capsys, tmp_path):
    user_error(capsys, ["generate", "--method", "fastw"], "^rcpp-hf generate: error: unknown method 'fastw'; known "
               "methods: .*fastv")  # fmt: skip
    bad_method = tmp_path / "bad_method.yaml"
    bad_method.write_text("query: first\n")
    user_error(capsys, ["generate", "--method", "fastv", "--method-config", str(bad_method)],
               "^rcpp-hf generate: error: FastV.query = 'first': must be one of")
    bad_config = tmp_path / "bad_config.yaml"
    bad_config.write_text("tau_mode: bogus\n")
    user_error(capsys, ["generate", "--config", str(bad_config)],
               "^rcpp-hf generate: error: RCPPGenerationConfig.tau_mode = 'bogus': must be one of")
    user_error(capsys, ["generate", "--config", str(tmp_path / "missing.yaml")], r"generation \(RCPP\) preset file not found")


def test_an_unknown_setting_lists_only_the_methods_fields(capsys, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("bogus: 1\n")
    line = user_error(capsys, ["generate", "--method", "fastv", "--method-config", str(settings)],
                      r"method 'fastv' has no setting\(s\) \['bogus'\]; its settings: \['budget', 'keep', 'layer', "
                      r"'query'\]$")  # fmt: skip
    assert "SETTING_ALIASES" not in line and "'name'" not in line
    for name, cls in METHODS.items():  # the ClassVars (name, kind, SETTING_ALIASES, ...) are not settings
        with pytest.raises(ValueError) as refused:
            method_config(name, bogus=1)
        fields = sorted(field.name for field in dataclasses.fields(cls))
        assert str(refused.value).endswith(f"its settings: {fields}")


# --- eval's data -----------------------------------------------------------------------------------------------


def test_missing_benchmark_data_is_named(capsys, tmp_path):
    run = ["--output-dir", str(tmp_path / "run")]
    user_error(capsys, ["eval", "pope", "--question-file", str(tmp_path / "coco_pope_random.json"), *run],
               "^rcpp-hf eval pope: error: --question-file .*coco_pope_random.json: no such file or folder")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("")
    user_error(capsys, ["eval", "pope", "--question-file", str(questions), "--image-folder", str(tmp_path / "val2014"),
                        *run], "^rcpp-hf eval pope: error: --image-folder .*val2014: folder not found")  # fmt: skip
    user_error(capsys, ["eval", "chair", "--image-folder", str(tmp_path), "--annotations", str(tmp_path / "ann"),
                        *run], "^rcpp-hf eval chair: error: --annotations .*ann: folder not found")  # fmt: skip
    user_error(capsys, ["eval", "chair", "--image-folder", str(tmp_path), "--annotations", str(tmp_path),
                        "--image-ids", str(tmp_path / "ids.txt"), *run], "--image-ids .*ids.txt: file not found")
    user_error(capsys, ["eval", "chair", "--image-folder", str(tmp_path), "--annotations", str(tmp_path), *run],
               "^rcpp-hf eval chair: error: not a COCO 2014 annotations folder")  # the library's own check
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path / "MME"), *run],
               "^rcpp-hf eval mme: error: --mme-root .*MME: folder not found")
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path), "--subtasks", "existence", *run],
               "^rcpp-hf eval mme: error: .*existence: MME subtask folder not found")


def text_files(folder: Path, names: list[str]) -> None:
    """Files named as images that hold text."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("not an image")


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the images were checked")


def test_an_eval_image_that_is_not_an_image_is_named_before_the_model_loads(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("rcpp_hf.eval.harness.load_model", no_model)
    monkeypatch.setattr("rcpp_hf.shapesworld.evaluate.RCPPLlavaForConditionalGeneration.from_pretrained", no_model)
    fix = "; replace each with the benchmark's image \\(PNG, JPEG, ...\\), or pass the folder that holds its images$"
    [image] = {json.loads(line)["image"] for line in FIXTURE_POPE.read_text().splitlines()[:6]}  # 6 questions, 1 image
    text_files(tmp_path / "val2014", [image])
    user_error(capsys, ["eval", "pope", "--question-file", str(FIXTURE_POPE), "--image-folder", str(tmp_path / "val2014"),
                        "--limit", "6", "--output-dir", str(tmp_path / "pope")],
               f"^rcpp-hf eval pope: error: image file PIL cannot read: .*val2014/{image} \\(not an image\\)" + fix)

    text_files(tmp_path / "coco", ["COCO_val2014_000000000073.jpg"])
    make_images(1)[0].save(tmp_path / "coco" / "COCO_val2014_000000000042.jpg")
    two_image_annotations(tmp_path / "annotations")
    user_error(capsys, ["eval", "chair", "--image-folder", str(tmp_path / "coco"), "--annotations",
                        str(tmp_path / "annotations"), "--num-images", "2", "--output-dir", str(tmp_path / "chair")],
               "^rcpp-hf eval chair: error: image file PIL cannot read: .*coco/COCO_val2014_000000000073.jpg \\(not an "
               "image\\)" + fix)  # fmt: skip (the readable 42 is not named)

    write_mme(tmp_path / "MME", text_files)
    user_error(capsys, ["eval", "mme", "--mme-root", str(tmp_path / "MME"), "--subtasks", "existence", "--output-dir",
                        str(tmp_path / "mme")],
               "^rcpp-hf eval mme: error: 2 image files PIL cannot read: .*existence/a.jpg \\(not an image\\), "
               ".*existence/b.png \\(not an image\\)" + fix)  # fmt: skip

    # eval shapesworld renders its images into the run folder and keeps those there: a damaged one is named
    scene = pope_scenes(DEFAULT_WORLD_SEED, 2)[0]
    text_files(tmp_path / "shapesworld" / "data" / "images", [scene.image_file])
    user_error(capsys, ["eval", "shapesworld", "--split", "random", "--num-images", "2", "--output-dir",
                        str(tmp_path / "shapesworld")],
               f"^rcpp-hf eval shapesworld: error: image file PIL cannot read: .*images/{scene.image_file} \\(not an "
               "image\\); delete each: the next run renders it again$")  # fmt: skip


def test_an_image_damaged_past_the_check_is_named_when_it_is_read(tmp_path):
    # verify() reads a JPEG's header only: a truncated one passes the check and fails when decoded
    image = truncated_jpeg(tmp_path / "truncated.jpg")
    check_images_readable([image])
    with pytest.raises(ValueError, match=r"^image file PIL cannot read: .*truncated.jpg \(image file is truncated"):
        EvalItem("a", "Describe.", image).load_image()
    text_files(tmp_path, ["x.jpg"])
    with pytest.raises(ValueError, match=r"^image file PIL cannot read: .*x.jpg \(not an image\)"):
        EvalItem("b", "Describe.", tmp_path / "x.jpg").load_image()


# --- bench -----------------------------------------------------------------------------------------------------


def test_a_bad_bench_shape_is_named(capsys):
    user_error(capsys, ["bench", "--shape", "huge"], "^rcpp-hf bench: error: --shape huge: unknown; choose one of "
               "tiny, small, 7b-width, 7b, next-tiny, next-small, next-7b, qwen-tiny, qwen-small, qwen-7b, "
               "or give --model$")  # fmt: skip


def test_bench_offers_only_combinations_that_run(capsys):
    # A contrastive decoder runs alone (protocol.check_combination): "<decoder>+rcpp" could never run.
    assert not set(CONTRASTIVE_WITH_RCPP) & set(known_methods())
    assert {"vcd", "sid", "plausibility_cutoff", "fastv+rcpp"} <= set(known_methods())
    with pytest.raises(ValueError, match=r"unknown \['vcd\+rcpp'\]"):
        BenchmarkSettings(methods=("vcd+rcpp",))
    user_error(capsys, ["bench", "--shape", "tiny", "--methods", "vanilla,sid+rcpp"],
               r"^rcpp-hf bench: error: BenchmarkSettings.methods: unknown \['sid\+rcpp'\]")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the list of methods
    assert "fastv+rcpp" in help_text.replace(" ", "")
    assert not any(name in help_text.replace(" ", "") for name in CONTRASTIVE_WITH_RCPP)


# --- how errors are reported -----------------------------------------------------------------------------------


def test_debug_and_the_environment_variable_raise_instead(monkeypatch):
    with pytest.raises(UsageError, match="--max-new-tokens 0: must be at least 1"):
        main(["--debug", "generate", "--max-new-tokens", "0"])
    monkeypatch.setenv("RCPP_HF_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["generate", "--max-new-tokens", "0"])


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(runs, reference=None):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("rcpp_hf.cli.report.write_report", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", str(tmp_path)])


def test_argparse_errors_still_exit_2():
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--max-new-tokens", "many"])
    assert exited.value.code == 2


def _run(command: list[str]) -> subprocess.CompletedProcess:
    # This checkout first on the path: the environment's editable install may be another checkout.
    environment = {key: value for key, value in os.environ.items() if key != "RCPP_HF_DEBUG"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(command, check=False, capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)


def test_the_console_script_prints_one_line_and_exits_2():
    script = Path(sys.executable).with_name("rcpp-hf")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rcpp_hf.cli"]
    done = _run([*command, "generate", "--max-new-tokens", "0"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["rcpp-hf generate: error: --max-new-tokens 0: must be at least 1"]


def test_python_m_with_debug_shows_the_traceback():
    done = _run([sys.executable, "-m", "rcpp_hf.cli", "--debug", "bench", "--shape", "huge"])
    assert done.returncode == 1
    assert "Traceback" in done.stderr and done.stderr.strip().endswith(
        "--shape huge: unknown; choose one of tiny, small, 7b-width, 7b, next-tiny, next-small, next-7b, qwen-tiny, "
        "qwen-small, qwen-7b, or give --model")
