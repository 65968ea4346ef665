"""Feature dashboards on a tiny LM: the pages hold each latent's top contexts (checked against codes computed
here), open in headless Chromium with no server or network (the embedded Plotly draws its histogram), and
bad input is named."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from lm_fixtures import write_corpus, write_tiny_llama

from sae_zoo.cli import main
from sae_zoo.dashboard import dashboard
from sae_zoo.data import ActivationDataModule
from sae_zoo.data.windows import read_windows
from sae_zoo.hub import load_run
from sae_zoo.recipe import fit, recipe_from_content

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: CI installs Chromium (the Makefile's `browser` target) and sets this, so that the browser test never skips there
REQUIRE_BROWSER = os.environ.get("SAE_ZOO_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A linear SAE on the tiny LM, an MLP head on its frozen decoder, and another SAE (another decoder)."""
    root = tmp_path_factory.mktemp("dashboard")
    data = {"name": "activations", "model": write_tiny_llama(root / "model"), "hook": "resid_post.1",
            "data_files": write_corpus(root / "text", n_files=6), "context_len": 24, "n_train_tokens": 1500,
            "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400, "batch_size": 100, "model_batch_size": 8,
            "cache_dir": str(root / "cache"), "ce_contexts": 4, "shuffle_buffer": 600}
    base = {"setting": "unknown", "data": data, "dictionary": {"n_latents": 24, "bias": True},
            "encoder": {"name": "linear", "subtract_decoder_bias": True}, "model": {"l1_coeff": 0.05, "lr": 0.003},
            "trainer": {"max_steps": 40, "accelerator": "cpu"}, "probing": {"enabled": False}}
    sae, _ = fit(recipe_from_content({**base, "run_dir": str(root / "sae")}), progress=False)
    mlp, _ = fit(recipe_from_content({**base, "setting": "known_dictionary", "dictionary": {"pretrained": str(sae)},
                                      "encoder": {"name": "mlp", "hidden": 32}, "run_dir": str(root / "mlp")}),
                 progress=False)
    other, _ = fit(recipe_from_content({**base, "seed": 1, "run_dir": str(root / "other")}), progress=False)
    return sae, mlp, other, data


class Contexts(HTMLParser):
    """Each ``.context`` div of a page: its window and the texts of its first line's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[tuple[int, list[str]]] = []
        self._depth, self._line, self._in_token = 0, 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "context" in (attrs.get("class") or "").split():
            self.contexts.append((int(attrs["data-window"]), []))
            self._depth, self._line = 1, 0
        elif tag == "div" and self._depth:
            self._depth += 1
            self._line += 1
        self._in_token = tag == "span" and "tok" in (attrs.get("class") or "").split() and self._depth > 0

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1
        self._in_token = False

    def handle_data(self, data):
        if self._in_token and self._line == 1:
            self.contexts[-1][1].append(data)


def expected_top_window(run_dir, data, latent):
    """The window where ``latent`` peaks, computed here from the run's model and the same windows."""
    model = load_run(run_dir)[0]
    dm = ActivationDataModule(**{k: v for k, v in data.items() if k != "name"})
    windows = read_windows(dm, "dashboard", dm.documents(), 2, limit=40,
                           identity={k: data.get(k) for k in ("dataset", "dataset_config", "data_files", "split",
                                                              "text_column")})
    x = windows.activations.float() * dm.scale
    with torch.no_grad():
        codes = model.encode(x.flatten(0, 1)).view(*x.shape[:2], -1)[..., latent]
    if dm.outlier_norm is not None:
        codes[x.norm(dim=-1) > dm.outlier_norm] = 0
    return int(codes.max(dim=1).values.argmax())


def test_the_dashboard_shows_each_latents_top_contexts_side_by_side(runs, tmp_path):
    sae, mlp, _, data = runs
    out = dashboard(sae, tmp_path / "dash", compare=mlp, n_latents=4, contexts=40)
    pages = sorted(out.glob("latent-*.html"))
    assert len(pages) == 4 and (out / "index.html").is_file()
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # the plotting library travels with the pages
    for page in pages:
        latent = int(page.stem.split("-")[1])
        html = page.read_text()
        assert "https://" not in html and "http://" not in html  # nothing to fetch
        parser = Contexts()
        parser.feed(html)
        first_window, first_tokens = parser.contexts[0]
        assert first_window == expected_top_window(sae, data, latent)
        assert len(first_tokens) > 3 and all(t.strip() for t in first_tokens)
        assert html.count('<section class="head"') == 2  # the SAE's codes and the MLP head's, side by side
        assert html.count("quantiles of its peaks") >= 3  # contexts from lower activation quantiles too
        assert "Promotes" in html and "Suppresses" in html  # the hook's width is the unembedding's
    index = (out / "index.html").read_text()
    assert all(f'href="{p.name}"' in index for p in pages)


def test_a_transcoders_latents_show_the_contexts_of_the_input_they_read(runs, tmp_path):
    _, _, _, data = runs
    data = {**data, "hook": "mlp_in.1", "hook_out": "mlp_out.1", "cache_dir": str(tmp_path / "cache")}
    run, _ = fit(recipe_from_content({"setting": "unknown", "data": data, "dictionary": {"n_latents": 24},
                                      "encoder": {"name": "linear"}, "model": {"l1_coeff": 0.05, "lr": 0.003},
                                      "trainer": {"max_steps": 40, "accelerator": "cpu"}, "probing": {"enabled": False},
                                      "run_dir": str(tmp_path / "transcoder")}), progress=False)
    out = dashboard(run, tmp_path / "dash", n_latents=3, contexts=40)
    assert "mlp_in.1, a transcoder writing mlp_out.1" in (out / "index.html").read_text()
    for page in sorted(out.glob("latent-*.html")):
        parser = Contexts()
        parser.feed(page.read_text())
        assert parser.contexts[0][0] == expected_top_window(run, data, int(page.stem.split("-")[1]))


def chromium(*args, timeout=120):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_BROWSER,
                    reason="no Chromium here (`make browser` installs Debian's package)")
def test_the_pages_render_in_headless_chromium_from_disk(runs, tmp_path):
    assert CHROMIUM is not None, "Chromium is required here: run `make browser`"
    sae, mlp, _, _ = runs
    out = dashboard(sae, tmp_path / "dash", compare=mlp, n_latents=2, contexts=40)
    page = sorted(out.glob("latent-*.html"))[0]
    profile = tmp_path / "profile"
    dom = chromium(f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    parser = Contexts()
    parser.feed(dom)
    written = Contexts()
    written.feed(page.read_text())
    assert parser.contexts and parser.contexts == written.contexts  # the browser's DOM holds the contexts
    assert 'class="main-svg"' in dom  # Plotly, loaded from the folder, drew the histogram
    shot = tmp_path / "latent.png"
    chromium(f"--user-data-dir={profile}", "--window-size=1200,900", f"--screenshot={shot}", page.as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    shaded = (pixels[..., 0] > 0.9) & (pixels[..., 2] < 0.6)  # orange token shading
    assert pixels.std() > 0.05 and shaded.sum() > 20


def test_bad_dashboard_input_is_named(runs, tmp_path, capsys):
    sae, mlp, other, _ = runs
    with pytest.raises(ValueError, match=r"--latents: 24, 99 out of range: .* has 24 latents \(0\.\.23\)"):
        dashboard(sae, tmp_path / "a", latents=[3, 24, 99])
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"does not decode with the atoms of"):
        dashboard(sae, tmp_path / "b", compare=other)
    synthetic, _ = fit(recipe_from_content({"trainer": {"max_steps": 2, "accelerator": "cpu"},
                                            "run_dir": str(tmp_path / "synthetic")}), progress=False)
    with pytest.raises(ValueError, match=r"data.name='synthetic', which has no text"):
        dashboard(synthetic, tmp_path / "c")
    assert main(["dashboard", str(sae), "--latents", "1,x"]) == 2
    assert "--latents: '1,x' is not a comma-separated list" in capsys.readouterr().err


def test_the_logit_lens_says_whether_it_folded_a_final_norm_in():
    from types import SimpleNamespace

    from sae_zoo.dashboard import logit_lens

    torch.manual_seed(0)
    unembed = torch.nn.Linear(4, 6, bias=False)
    tokenizer = SimpleNamespace(decode=lambda ids: f"t{ids[0]}")
    atoms = torch.randn(2, 4)
    for base, folded in ((SimpleNamespace(), False), (SimpleNamespace(norm=torch.nn.LayerNorm(4)), True)):
        lm = SimpleNamespace(get_output_embeddings=lambda: unembed, base_model=base)
        datamodule = SimpleNamespace(language_model=lambda: (lm, tokenizer, None))
        tokens, how = logit_lens(datamodule, atoms, top=2)
        assert ("final norm's weight folded in" in how) == folded and ("no final norm" in how) != folded
        assert len(tokens) == 2 and len(tokens[0]["promoted"]) == 2
