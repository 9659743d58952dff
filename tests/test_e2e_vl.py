"""The VL model (Ernie4_5_VLMoeForConditionalGeneration) through the whole pipeline, against transformers
eager on the same weights: image features, text-only and image+text prompts (greedy tokens)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rel_error
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.runtime import Session, vision
from vl_folder import make_vl_folder

REL_TOL = 1e-4  # fp32; relative to max|x| of the reference
GRIDS = [(1, 4, 6), (1, 6, 4), (1, 2, 2)]  # patches of three image shapes (h, w in patches)


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory):
    # a correction bias as large as the routers' softmax spread: it changes the chosen experts (asserted)
    return make_vl_folder(tmp_path_factory.mktemp("vl-ckpt"), correction_bias=0.5)


@pytest.fixture(scope="module")
def reference(vl_folder):
    import transformers

    return transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(vl_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiled(vl_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl-art")
    report = compile_model(CompileOptions(output=out, model=str(vl_folder), max_seq_len=256), log=lambda *_: None)
    return out, report


def _patches(grid, seed):
    """Random normalised patches of one image [t·h·w, C·14·14], as the processor's output holds them."""
    t, h, w = grid
    return np.random.default_rng(seed).standard_normal((t * h * w, 3 * 14 * 14)).astype(np.float32)


def _prompt(images, spec, text=(17, 300, 5)):
    """ids: a few text tokens, each image's start / placeholders / end, more text."""
    ids = [5, 99]
    for grid in images:
        ids += [spec.image_start_token_id] + [spec.image_token_id] * vision.image_token_count(grid, spec.merge_size) \
            + [spec.image_end_token_id]
    return ids + list(text)


def _eager_generate(model, ids, images, n):
    pixel = torch.from_numpy(np.concatenate([p for p, _ in images]))
    grid = torch.tensor([list(g) for _, g in images])
    idt = torch.tensor([ids])
    image_id = model.config.image_token_id
    bounds = (model.config.image_start_token_id, model.config.image_end_token_id)
    mm = (idt == image_id).long()
    moe = (mm.bool() | (idt == bounds[0]) | (idt == bounds[1])).long()
    with torch.no_grad():
        out = model.generate(input_ids=idt, pixel_values=pixel, image_grid_thw=grid, mm_token_type_ids=mm,
                             moe_mm_token_type_ids=moe, max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_correction_bias_changes_the_chosen_experts(reference):
    """Precondition: with this checkpoint's bias, some token's top-k differs from the softmax's own."""
    torch.manual_seed(0)
    x = torch.randn(64, reference.config.text_config.hidden_size)
    layer = next(layer for layer in reference.model.language_model.layers if hasattr(layer.mlp, "text_moe"))
    for moe in (layer.mlp.text_moe, layer.mlp.vision_moe):
        probs = torch.softmax(x @ moe.gate.weight.T, -1)
        _, biased, chosen = moe.gate(x)
        assert (chosen.sort(-1).values != probs.topk(moe.gate.top_k, -1).indices.sort(-1).values).any()


def test_every_vl_pass_matches(compiled, reference):
    _, report = compiled
    text = reference.config.text_config
    sparse = sum(kind == "sparse" for kind in text.mlp_layer_types)
    passes = report["passes"]
    assert passes["fuse_modality_moe"] == {"matched": sparse, "expected": sparse} and sparse > 0
    assert passes["route_vision_attention"]["matched"] == reference.config.vision_config.depth
    assert passes["route_attention_to_kv_cache"]["matched"] == text.num_hidden_layers
    assert passes["merge_still_frames"]["matched"] == passes["place_image_features"]["matched"] == 1


def test_decode_reads_no_vision_weight(vl_folder):
    """The text steps hold no vision expert and no vision tower: they take those weights unread."""
    from tvm import relax

    from ernie_compile.compiler.capture import capture
    from ernie_compile.compiler.load import load
    from ernie_compile.compiler.lower import lower
    from ernie_compile.compiler.weights import fake_parameters
    from ernie_compile.passes import select_passes
    from ernie_compile.targets import get_target

    model = load(str(vl_folder), materialize=False).model
    passes = select_passes(model.config)
    with fake_parameters(model):
        captured = capture(model, 64, passes)
    mod, _, weights = lower(captured, model.config, get_target("cpu"), passes)

    def read(name):
        f = mod[name]
        used = {str(v) for v in relax.analysis.free_vars(f.body)}
        return {w.name for w, v in zip(weights, f.params[int(f.attrs["num_input"]):]) if str(v) in used}

    vision_weights = {w.name for w in weights if "vision" in w.name or "resampler" in w.name}
    assert any("vision_moe" in n for n in vision_weights) and any("vision_tower" in n for n in vision_weights)
    for step in ("decode", "prefill"):
        assert not read(step) & vision_weights, step
    assert {n for n in read("prefill_mm") if "vision_moe" in n}
    assert not {n for n in read("encode_image") if "language_model" in n}


@pytest.mark.parametrize("grid", GRIDS[:2])
def test_image_features_match_eager(compiled, reference, grid):
    out, _ = compiled
    session = Session(out)
    spec = vision.VisionSpec.from_json(session.vision)
    patches = _patches(grid, 1)
    got = session.engine.encode_image(patches, vision.vision_positions(grid, spec.merge_size), spec.merge_size ** 2)
    with torch.no_grad():
        want = reference.model.get_image_features(torch.from_numpy(patches), torch.tensor([grid])).pooler_output[0]
    assert got.shape == tuple(want.shape) and rel_error(got, want) <= REL_TOL


def test_text_prompt_greedy_identical(compiled, reference):
    out, _ = compiled
    ids = [5, 17, 300, 981, 42, 7]
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert Session(out).generate(ids, 16, stop_at_eos=False).tokens == want


@pytest.mark.parametrize("grids", [GRIDS[:1], GRIDS[1:2], GRIDS[:2]], ids=["4x6", "6x4", "two-images"])
def test_image_prompt_greedy_identical(compiled, reference, grids):
    out, _ = compiled
    session = Session(out)
    spec = vision.VisionSpec.from_json(session.vision)
    images = [(_patches(g, i + 3), g) for i, g in enumerate(grids)]
    ids = _prompt(grids, spec)
    want = _eager_generate(reference, ids, images, 12)
    got = session.generate(ids, 12, stop_at_eos=False, images=images)
    assert got.tokens == want
    assert session.rope_delta < 0  # decoding really ran at positions behind the cache slots


def test_image_prefill_logits_match_eager(compiled, reference):
    out, _ = compiled
    session = Session(out)
    spec = vision.VisionSpec.from_json(session.vision)
    grid = GRIDS[0]
    images = [(_patches(grid, 7), grid)]
    ids = _prompt([grid], spec)
    logits = session.forward_images(ids, images)
    idt = torch.tensor([ids])
    mm = (idt == spec.image_token_id).long()
    moe = (mm.bool() | (idt == spec.image_start_token_id) | (idt == spec.image_end_token_id)).long()
    with torch.no_grad():
        want = reference(input_ids=idt, pixel_values=torch.from_numpy(images[0][0]), image_grid_thw=torch.tensor([grid]),
                         mm_token_type_ids=mm, moe_mm_token_type_ids=moe).logits[0, -1]
    assert rel_error(logits, want) <= REL_TOL


def test_placeholder_count_must_match_images(compiled):
    from ernie_compile.errors import UserError

    out, _ = compiled
    session = Session(out)
    spec = vision.VisionSpec.from_json(session.vision)
    grid = GRIDS[0]
    ids = _prompt([grid], spec)
    ids.remove(spec.image_token_id)  # one placeholder short
    with pytest.raises(UserError, match="placeholder"):
        session.forward_images(ids, [(_patches(grid, 0), grid)])


def _image_files(folder):
    """A PNG and a JPEG of noise, two sizes (one over the processor's pixel limit: resized)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    png, jpg = folder / "a.png", folder / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(png)
    Image.fromarray(rng.integers(0, 256, (400, 260, 3), dtype=np.uint8)).save(jpg, quality=90)
    return png, jpg


def test_ernie_run_images_from_files_match_the_processor_and_eager(compiled, reference, vl_folder, tmp_path):
    """ernie-run --image … --prompt TEXT: the ids the checkpoint's own processor builds for one user
    message (images, then text) and greedy tokens identical to transformers generate on them."""
    import json

    from conftest import run_cli
    from vl_folder import image_processor_oracle

    out, _ = compiled
    png, jpg = _image_files(tmp_path)
    text = "Compare the values"
    proc = run_cli("ernie_compile.runtime.cli", str(out), "--image", str(png), "--image", str(jpg),
                   "--prompt", text, "--max-new-tokens", "10", "--ignore-eos", "--json")
    got = json.loads(proc.stdout)
    processor = image_processor_oracle(vl_folder)
    conversation = [{"role": "user", "content": [{"type": "image", "url": str(png)}, {"type": "image", "url": str(jpg)},
                                                 {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert got["prompt_tokens"] == n
    assert got["image_tokens"] == (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=10, do_sample=False)[0, n:].tolist()
    assert got["tokens"] == want


def test_ernie_run_text_prompt_on_the_vl_artifact(compiled, reference):
    import json

    from conftest import run_cli

    out, _ = compiled
    ids = [5, 17, 300, 981]
    got = json.loads(run_cli("ernie_compile.runtime.cli", str(out), "--prompt-ids", ",".join(map(str, ids)),
                             "--max-new-tokens", "6", "--ignore-eos", "--json").stdout)
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert got["tokens"] == want and "image_tokens" not in got


@pytest.mark.parametrize("case", ["not-an-image", "truncated-png", "missing", "text-only-artifact", "no-prompt"])
def test_ernie_run_bad_image_input(compiled, tmp_path, case, request):
    from conftest import run_cli

    out, _ = compiled
    png, _ = _image_files(tmp_path)
    args = ["--prompt", "Describe"]
    if case == "not-an-image":
        bad = tmp_path / "notes.png"
        bad.write_text("this is text, not pixels")
        image, expect = bad, "notes.png"
    elif case == "truncated-png":
        bad = tmp_path / "cut.png"
        bad.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
        image, expect = bad, "cut.png"
    elif case == "missing":
        image, expect = tmp_path / "nowhere.png", "nowhere.png"
    elif case == "no-prompt":
        image, expect, args = png, "--prompt", ["--prompt-ids", "1,2,3"]
    else:
        text_art = tmp_path_factory_artifact(request)
        out, image, expect = text_art, png, "text-only"
    proc = run_cli("ernie_compile.runtime.cli", str(out), "--image", str(image), *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr


def tmp_path_factory_artifact(request):
    """The embedded text model compiled once (a text-only artifact)."""
    factory = request.getfixturevalue("tmp_path_factory")
    out = factory.mktemp("tiny-text")
    compile_model(CompileOptions(output=out, max_seq_len=64), log=lambda *_: None)
    return out


def _data_url(path) -> str:
    import base64

    kind = "png" if str(path).endswith(".png") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def test_ernie_serve_images_match_the_processor_and_eager(compiled, reference, vl_folder, tmp_path):
    """ernie-serve on the VL artifact, through the official openai client: a chat message with two
    images (data: URLs) then text gives the ids the checkpoint's processor builds and transformers'
    greedy tokens, while a text-only request runs alongside (its decode steps interleave with the
    image sequence's, whose RoPE positions carry its rope delta) and equals transformers too; the
    same request again (no prefix sharing for prompts with images) gives the same tokens; an http
    URL, bad base64 and undecodable bytes are 400s with OpenAI's error object."""
    import concurrent.futures
    import json
    import queue
    import subprocess
    import sys
    import threading
    import time

    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from vl_folder import image_processor_oracle

    out, _ = compiled
    png, jpg = _image_files(tmp_path)
    text = "Compare the values"
    proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.serve.cli", str(out), "--port", "0",
                             "--max-batch", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("listening on http://"):
                port = int(line.rsplit(":", 1)[1])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(content, n):
            r = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                               max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
            return r.usage.prompt_tokens, r.choices[0].token_ids

        with_images = [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                       {"type": "image_url", "image_url": {"url": _data_url(jpg)}}, {"type": "text", "text": text}]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            image_job = pool.submit(ask, with_images, 10)
            text_job = pool.submit(ask, "Hello there", 10)
            (n_img, got_img), (n_txt, got_txt) = image_job.result(), text_job.result()
        assert ask(with_images, 10) == (n_img, got_img)

        processor = image_processor_oracle(vl_folder)
        conversation = [{"role": "user", "content": [{"type": "image", "url": str(png)}, {"type": "image", "url": str(jpg)},
                                                     {"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        assert n_img == inputs["input_ids"].shape[1]
        with torch.no_grad():
            assert got_img == reference.generate(**inputs, max_new_tokens=10, do_sample=False)[0, n_img:].tolist()
        plain = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")
        assert n_txt == plain["input_ids"].shape[1]
        with torch.no_grad():
            assert got_txt == reference.generate(**plain, max_new_tokens=10, do_sample=False)[0, n_txt:].tolist()

        bad = {"http": "http://example.com/a.png", "base64": "data:image/png;base64,@@@",
               "bytes": "data:image/png;base64,aGVsbG8="}
        for case, url in bad.items():
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="vl", max_tokens=2, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}])
            assert e.value.status_code == 400, case
            message = json.loads(e.value.response.text)["error"]["message"]
            assert {"http": "only data: URLs", "base64": "not valid base64", "bytes": "image 1"}[case] in message
    finally:
        proc.kill()
        proc.wait(10)


def test_quantized_vl_matches_fake_quant_eager(vl_folder, tmp_path):
    """--bits per category, the vision tower too: features and image-prompt greedy tokens equal those of
    transformers eager with every quantized weight dequantized (the routers stay fp32)."""
    import transformers

    from ernie_compile.quant import QuantPolicy
    from test_quantize import fake_quant

    text = "experts=4,attn=4,mlp=8,embed=8,vision=8"
    compile_model(CompileOptions(output=tmp_path / "q", model=str(vl_folder), max_seq_len=128, bits=text,
                                 act_bits="none"), log=lambda *_: None)
    ref = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(vl_folder, dtype=torch.float32).eval()
    ref = fake_quant(ref, QuantPolicy.parse(text, act_bits=None))
    session = Session(tmp_path / "q")
    names = session.manifest.data["weights"]["quantized"]
    assert any("vision_tower" in n for n in names) and any("vision_moe.experts" in n for n in names)
    assert not any(n.endswith(".gate.weight") for n in names)  # routers stay fp32
    spec = vision.VisionSpec.from_json(session.vision)
    grids = GRIDS[:2]
    images = [(_patches(g, i + 11), g) for i, g in enumerate(grids)]
    got = session.engine.encode_image(images[0][0], vision.vision_positions(grids[0], spec.merge_size), 4)
    with torch.no_grad():
        want = ref.model.get_image_features(torch.from_numpy(images[0][0]), torch.tensor([grids[0]])).pooler_output[0]
    assert rel_error(got, want) <= REL_TOL
    ids = _prompt(grids, spec)
    assert session.generate(ids, 10, stop_at_eos=False, images=images).tokens == _eager_generate(ref, ids, images, 10)


@pytest.mark.parametrize("flags, expect", [(["--backend", "inductor"], "tvm backend only"),
                                           (["--target", "webgpu"], "paged KV cache")])
def test_vl_refused_where_it_cannot_run(tmp_path, flags, expect):
    from conftest import run_cli

    proc = run_cli("ernie_compile.cli", "--model", "ernie-vl-tiny", *flags, "-o", str(tmp_path / "o"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
