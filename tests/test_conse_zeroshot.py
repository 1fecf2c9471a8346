"""mini's zero-shot with its image tower's ImageNet classifier (encoders/conse_zeroshot.py):
the scoring against hand-computed values on a toy tower, and the wiring through classify."""

from __future__ import annotations

import math

import numpy as np
from searchkit.encoders.conse_zeroshot import class_weights, mixed_probabilities, tower_scores
from tests.conftest import make_images
from tests.test_onnx import needs_mini_towers

# a toy tower: 3 classes; class 0 has two names, the others one; 2-d text space
NAME_TEXT = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
NAME_CLASS = np.array([0, 0, 1, 2])
LABEL_TEXT = np.array([[1.0, 0.0], [0.0, 1.0]])


def softmax2(a, b, tau):
    ea, eb = math.exp(a / tau), math.exp(b / tau)
    return ea / (ea + eb), eb / (ea + eb)


def test_class_weights_take_the_best_synonym_and_the_top_k_classes():
    w = class_weights(LABEL_TEXT, NAME_TEXT, NAME_CLASS, 3, top_k=2, tau=0.5)
    # label 0: class cosines (best name) 1, 0.6, -1 -> classes 0 and 1 kept
    # label 1: class 0's second name gives 1, class 1 gives 0.8, class 2 gives 0 -> classes 0 and 1
    w00, w01 = softmax2(1.0, 0.6, 0.5)
    w10, w11 = softmax2(1.0, 0.8, 0.5)
    np.testing.assert_allclose(w, [[w00, w01, 0.0], [w10, w11, 0.0]], atol=1e-12)
    # top_k=1: all weight on the nearest class
    np.testing.assert_allclose(class_weights(LABEL_TEXT, NAME_TEXT, NAME_CLASS, 3, top_k=1, tau=0.5), [[1, 0, 0], [1, 0, 0]])


def test_tower_scores_and_the_mix_match_hand_computed_values():
    w = class_weights(LABEL_TEXT, NAME_TEXT, NAME_CLASS, 3, top_k=2, tau=0.5)
    probs = np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])  # the second image sees only class 2
    s = tower_scores(probs, w)
    w00, w01 = softmax2(1.0, 0.6, 0.5)
    w10, w11 = softmax2(1.0, 0.8, 0.5)
    np.testing.assert_allclose(s, [[0.5 * w00 + 0.3 * w01, 0.5 * w10 + 0.3 * w11], [0.0, 0.0]], atol=1e-12)

    head = np.array([[2.0, 1.0], [0.0, 3.0]])
    p = mixed_probabilities(head, s, beta=2.0, eps=1e-6)
    for row in range(2):
        logits = [head[row, j] + 2.0 * math.log(1e-6 + s[row, j]) for j in range(2)]
        e = [math.exp(x - max(logits)) for x in logits]
        np.testing.assert_allclose(p[row], [x / sum(e) for x in e], rtol=1e-6)
    # the tower says nothing about image 2's labels: the heads decide alone
    np.testing.assert_allclose(p[1], mixed_probabilities(head[1:], np.zeros((1, 2)))[0], rtol=1e-6)
    assert p[1].argmax() == 1
    # beta 0 is exactly the heads' softmax
    e = np.exp(head[0] - head[0].max())
    np.testing.assert_allclose(mixed_probabilities(head, s, beta=0.0)[0], e / e.sum(), rtol=1e-6)


@needs_mini_towers
def test_mini_classify_mixes_the_heads_with_the_tower_classifier(tmp_path):
    import torch

    import searchkit
    from searchkit.encoders.conse_zeroshot import ConSEZeroShot, class_name_text
    from searchkit.images import load_image
    from searchkit.zeroshot import DEFAULT_TEMPLATES, label_embeddings

    enc = searchkit.get_encoder("mini")
    labels = ["daisy", "sports car", "tabby cat"]
    paths = make_images(tmp_path / "imgs", 3)
    got = searchkit.classify_images(enc, [str(p) for p in paths], labels)

    # the same figures from the encoder's public pieces
    name_text, name_class = class_name_text(enc)
    assert name_text.shape == (len(name_class), 384) and name_class.max() == 999
    raw_label = enc.text_tower.features([t.format(lab) for lab in labels for t in DEFAULT_TEMPLATES]).numpy()
    raw_label = raw_label.reshape(3, len(DEFAULT_TEMPLATES), -1).mean(1)
    raw_label /= np.linalg.norm(raw_label, axis=1, keepdims=True)
    w = class_weights(raw_label, name_text, name_class, 1000)
    images = [load_image(p, draft_size=enc.image_size) for p in paths]
    torch_enc = getattr(enc, "torch_encoder", lambda: enc)()  # (mini's image tower may run on ONNX)
    batch = torch.stack([torch_enc.preprocess(im) for im in images])
    tower = enc.image_tower
    class_probs = tower.class_logits(tower.raw_features(batch)).softmax(-1).numpy()
    head = enc.logit_scale * enc.encode_images(images) @ label_embeddings(enc, labels, DEFAULT_TEMPLATES).T
    want = mixed_probabilities(head, tower_scores(class_probs, w))
    for r, row in zip(got, want):
        np.testing.assert_allclose([r.scores[lab] for lab in labels], row, atol=1e-4)
        assert r.label == labels[int(row.argmax())]
    assert isinstance(ConSEZeroShot.for_encoder(getattr(enc, "torch_encoder", lambda: enc)(), labels, DEFAULT_TEMPLATES).weights, np.ndarray)

    # eval zeroshot scores the same way: one folder per label, each holding all three images
    from searchkit.evaluate import evaluate_zeroshot

    for lab in labels:
        make_images(tmp_path / "sets" / lab.replace(" ", "_"), 3)
    report = evaluate_zeroshot(enc, tmp_path / "sets")
    predicted = [labels[int(i)] for i in want.argmax(1)]
    assert report.confusion == [[predicted.count(lab) for lab in report.labels]] * 3

    # the shipped class-name embeddings are the text tower's (fp16): check a few rows
    rows = [0, 1, len(name_class) - 1]
    from searchkit.encoders.conse_zeroshot import CLASS_TEMPLATE, imagenet_synonyms

    names = [s for group in imagenet_synonyms() for s in group]
    fresh = enc.text_tower.features([CLASS_TEMPLATE.format(names[i]) for i in rows]).numpy()
    np.testing.assert_allclose(name_text[rows], fresh, atol=2e-3)


def test_an_encoder_without_its_own_scorer_keeps_the_nearest_prompt_recipe():
    from searchkit.encoders import get_encoder
    from searchkit.zeroshot import DEFAULT_TEMPLATES, label_embeddings, label_scorer, probabilities
    from tests.conftest import TINY, noise_image

    tiny_encoder = get_encoder(TINY)

    labels = ["cat", "dog"]
    images = [noise_image(i) for i in range(2)]
    want = probabilities(tiny_encoder.encode_images(images), label_embeddings(tiny_encoder, labels, DEFAULT_TEMPLATES),
                         tiny_encoder.logit_scale)
    np.testing.assert_allclose(label_scorer(tiny_encoder, labels, DEFAULT_TEMPLATES)(images), want, rtol=1e-5)
