"""k-sparse probing: the probes find a concept a latent carries, stay at chance on labels the text does not
carry, never split a document across train and test, and refuse tasks they cannot fit."""

import pytest
import torch
from lm_fixtures import write_corpus, write_labelled_corpus, write_tiny_llama

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import ActivationDataModule
from sae_zoo.evaluation import ProbingConfig, sparse_probing
from sae_zoo.evaluation.probing import ProbeSet, probe_accuracy, probe_hits, probe_set, task_labels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("probing")
    metadata, texts = write_labelled_corpus(root / "labelled")
    return write_tiny_llama(root / "model"), write_corpus(root / "text"), metadata, texts


def datamodule(corpus, tmp_path):
    model, files, _, _ = corpus
    return ActivationDataModule(model, "resid_post.1", data_files=files, context_len=16, n_train_tokens=600,
                                n_test_tokens=150, shard_tokens=300, batch_size=100, cache_dir=str(tmp_path / "cache"))


def config(corpus, **kwargs):
    _, _, metadata, texts = corpus
    return ProbingConfig(metadata=metadata, texts=texts, **{"tasks": ("party", "delivery"), "folds": 4, **kwargs})


def hand_made(n_docs=40, per_doc=3, width=10, informative=3, seed=0):
    """Features where only column ``informative`` tells the class (by document)."""
    g = torch.Generator().manual_seed(seed)
    documents = torch.arange(n_docs).repeat_interleave(per_doc)
    metadata = [{"party": ("Democratic", "Republican")[i % 2]} for i in range(n_docs)]
    features = torch.randn(len(documents), width, generator=g)
    features[:, informative] += 3.0 * (documents % 2 == 0)  # Democratic documents are even
    return ProbeSet(torch.empty(0), documents, metadata), features


def test_one_informative_latent_is_found_and_noise_stays_at_chance():
    probes, features = hand_made()
    cfg = ProbingConfig(tasks=("party",), folds=4)
    label, fold = task_labels("party", ProbingConfig().task_table()["party"], probes, cfg)

    def accuracy(x):
        return probe_accuracy(probe_hits(x, label, fold, probes.documents, 1, 4, len(probes.metadata)))

    accuracy_, se = accuracy(features)
    assert accuracy_ > 0.9 and 0 < se < 0.05
    chance, chance_se = accuracy(torch.randn_like(features))
    assert abs(chance - 0.5) < 3 * chance_se + 0.05
    hidden = features.clone()
    hidden[:, 3] = torch.randn(len(hidden))  # the concept gone: the k=1 probe falls to chance
    assert accuracy(hidden)[0] < 0.7
    tally = probe_hits(features, label, fold, probes.documents, 1, 4, len(probes.metadata))
    assert tally[1].tolist() == [3.0] * 40  # every window tested once, per document


def test_folds_split_by_document_with_balanced_classes():
    probes, _ = hand_made(n_docs=41)  # 21 Democratic documents, 20 Republican: one is left out
    cfg = ProbingConfig(tasks=("party",), folds=4)
    label, fold = task_labels("party", ProbingConfig().task_table()["party"], probes, cfg)
    for doc in range(41):
        assert len(set(fold[probes.documents == doc].tolist())) == 1  # a document sits in one fold
    used = fold >= 0
    assert int((label[used] == 1).sum()) == int((label[used] == 0).sum()) == 20 * 3
    for f in range(4):
        test = fold == f
        assert set(probes.documents[test].tolist()).isdisjoint(probes.documents[used & ~test].tolist())


def test_probing_a_tiny_lm_finds_the_concept_in_the_text_and_not_the_random_label(corpus, tmp_path):
    dm = datamodule(corpus, tmp_path)
    d_model = dm.d_model
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("linear", d_model=d_model, n_latents=64),
                        Dictionary(64, d_model, trainable=False))
    out = sparse_probing(model, dm, config(corpus))
    assert out["probe_party_dense"] > 0.9  # the text's half of the vocabulary is in the activations
    assert abs(out["probe_delivery_dense"] - 0.5) < 3 * out["probe_delivery_dense_se"] + 0.1  # a coin flip
    assert out["probe_party_k20"] > 0.75 and out["probe_party_k20"] >= out["probe_party_k1"] - 0.1
    assert out["probe_k1"] == pytest.approx((out["probe_party_k1"] + out["probe_delivery_k1"]) / 2)
    assert {f"probe_party_k{k}_se" for k in (1, 2, 5, 20)} <= out.keys()
    # the windows were read once: the cache is used on the next call
    cached = probe_set(dm, config(corpus))
    assert cached.activations.shape[1:] == (15, d_model) and len(cached.documents) == 40 * 4


def test_bad_probing_input_gets_a_clear_error(corpus, tmp_path):
    dm = datamodule(corpus, tmp_path)
    model = SparseCoder(create_encoder("linear", d_model=16, n_latents=8), Dictionary(8, 16, trainable=False))
    with pytest.raises(ValueError, match=r"probing task 'era'.*no column 'decade'.*columns are fileid, party"):
        sparse_probing(model, dm, config(corpus, tasks={"era": {"column": "decade", "classes": {
            "old": {"below": 1900}, "new": {"above": 1950}}}}))
    # the labelled corpus runs from 1800 to 1995: one document after 1990 cannot fill four folds
    with pytest.raises(ValueError, match=r"probing task 'late': fold 1 of 4: its train windows are early: 0, late: 0, "
                                         r"and a probe needs both"):
        sparse_probing(model, dm, config(corpus, tasks={"late": {"column": "year", "classes": {
            "early": {"below": 1900}, "late": {"above": 1990}}}}))
    with pytest.raises(ValueError, match="unknown task.*'partisan'|unknown task.*partisan"):
        ProbingConfig(tasks=("partisan",))
    with pytest.raises(ValueError, match=r"probing task 'party'.*column 'party'.*cannot compare"):
        sparse_probing(model, dm, config(corpus, tasks={"party": {"column": "party", "classes": {
            "old": {"below": 1900}, "new": {"above": 1950}}}}))
    with pytest.raises(ValueError, match=r"probing.tasks.three.classes: a probe tells two classes apart, got 3"):
        ProbingConfig(tasks={"three": {"column": "party", "classes": {"a": {"in": ["x"]}, "b": {"in": ["y"]},
                                                                       "c": {"in": ["z"]}}}})
    with pytest.raises(ValueError, match="probing.ks"):
        ProbingConfig(ks=[0, 5])
    with pytest.raises(FileNotFoundError, match="probing.metadata: no such file"):
        sparse_probing(model, dm, ProbingConfig(metadata=str(tmp_path / "missing.csv")))
