"""Tests of minimal3d/vmf_contrast.py against naive per-vertex loops, gradcheck and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimal3d.vmf_contrast import (
    VertexMemory,
    _sample_vertices,
    background_repulsion,
    cell_class_scores,
    classification_scores,
    confusion_weights,
    grouped_vmf_contrast,
    pairwise_confusion,
)

SIZES = [5, 4, 6]


def make_case(seed=0, sizes=SIZES, batch=3, dim=4, num_background=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    memory = VertexMemory(sizes, dim=dim, num_background=num_background, generator=g).to(dtype)
    memory.vertices.copy_(F.normalize(memory.vertices, dim=-1))  # unit in float64, not just float32
    memory.background.copy_(F.normalize(memory.background, dim=-1))
    K_max = max(sizes) + 1  # one padded slot more than any class
    labels = torch.tensor([0, 2, 2, 1, 0][:batch])
    features = F.normalize(torch.randn(batch, K_max, dim, generator=g, dtype=dtype), dim=-1)
    keypoints = torch.rand(batch, K_max, 2, generator=g, dtype=dtype) * 100
    visible = (torch.rand(batch, K_max, generator=g) > 0.3).to(dtype)
    omega = torch.rand(len(sizes), len(sizes), generator=g, dtype=dtype) + 0.1
    return memory, features, keypoints, visible, labels, omega


def naive_loss(memory, features, keypoints, visible, labels, omega, sampled, temperature=0.07,
               threshold=48.0, background_weight=0.005, scale="none", form="paper"):
    """Explicit loops over images and vertices (float64).

    form="paper": Eq. 5 = mean over visible vertices of L_in (Eq. 2) + L_cross (Eq. 4), two softmaxes;
    form="novum": one softmax over own class, background and the other classes' columns.
    """
    total, count = 0.0, 0
    for b in range(features.shape[0]):
        y = int(labels[b])
        own = memory.class_vertices(y)
        for k in range(own.shape[0]):
            if visible[b, k] <= 0:
                continue
            f = features[b, k]
            positive = torch.exp(f @ own[k] / temperature)
            own_sum = 0.0  # Eq. 2: own class (near vertices dropped, k kept) + weighted background
            for j in range(own.shape[0]):
                near = (keypoints[b, k] - keypoints[b, j]).norm() <= threshold
                if j == k or not near:
                    own_sum = own_sum + torch.exp(f @ own[j] / temperature)
            for n in range(memory.background.shape[0]):
                own_sum = own_sum + background_weight * torch.exp(f @ memory.background[n] / temperature)
            cross_sum = 0.0  # Eq. 4: N sampled vertices of every other class, weighted by omega
            for other in range(memory.num_classes):
                if other == y or omega[y, other] <= 0:
                    continue
                rows = sampled[other]
                weight = omega[y, other] * (memory.num_vertices[other] / len(rows) if scale == "k_over_n" else 1.0)
                for row in rows:
                    cross_sum = cross_sum + weight * torch.exp(f @ memory.vertices[row] / temperature)
            if form == "paper":
                loss_in = -torch.log(positive / own_sum)  # Eq. 2
                loss_cross = -torch.log(positive / (positive + cross_sum))  # Eq. 4
                total = total + loss_in + loss_cross  # Eq. 5
            else:
                total = total - torch.log(positive / (own_sum + cross_sum))
            count += 1
    return total / count


def all_rows(memory):
    return {c: list(range(int(memory.class_offsets[c]), int(memory.class_offsets[c + 1])))
            for c in range(memory.num_classes)}


def sampled_rows(memory, num_sampled, seed):
    rows, count = _sample_vertices(memory, num_sampled, torch.Generator().manual_seed(seed))
    return {c: rows[c, :int(count[c])].tolist() for c in range(memory.num_classes)}


@pytest.mark.parametrize("form", ["paper", "novum"])
def test_full_contrast_matches_naive_loops(form):
    memory, features, keypoints, visible, labels, omega = make_case()
    loss = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None, form=form)
    expected = naive_loss(memory, features, keypoints, visible, labels, omega, all_rows(memory), form=form)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["paper", "novum"])
@pytest.mark.parametrize("scale", ["none", "k_over_n"])
def test_grouped_contrast_loss_and_gradient_match_naive_loops(scale, form):
    memory, features, keypoints, visible, labels, omega = make_case(seed=1)
    ours = features.clone().requires_grad_(True)
    loss = grouped_vmf_contrast(ours, keypoints, visible, labels, memory, omega=omega, num_sampled=2,
                                cross_class_scale=scale, generator=torch.Generator().manual_seed(7), form=form)
    dense = features.clone().requires_grad_(True)
    expected = naive_loss(memory, dense, keypoints, visible, labels, omega, sampled_rows(memory, 2, 7), scale=scale,
                          form=form)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, dense.grad, rtol=0, atol=1e-12)


def test_paper_form_is_not_the_single_softmax():
    """Eq. 5 is two softmax terms; it exceeds NOVUM's one-softmax value on the same columns."""
    memory, features, keypoints, visible, labels, omega = make_case(seed=2)
    paper = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None)
    novum = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None,
                                 form="novum")
    assert float(paper) > float(novum) + 1e-3


@pytest.mark.parametrize("form", ["paper", "novum"])
def test_grouped_with_all_vertices_and_unit_omega_equals_full(form):
    memory, features, keypoints, visible, labels, _ = make_case(seed=2, sizes=[6, 6, 6])
    full = grouped_vmf_contrast(features, keypoints, visible, labels, memory, num_sampled=None, form=form)
    for scale in ("none", "k_over_n"):  # N = K: sampling is a permutation, both scales agree
        grouped = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=torch.ones(3, 3).double(),
                                       num_sampled=6, cross_class_scale=scale, form=form,
                                       generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(grouped, full, rtol=0, atol=1e-13)


@pytest.mark.parametrize("form", ["paper", "novum"])
def test_zero_omega_removes_class_columns_exactly(form):
    memory, features, keypoints, visible, labels, omega = make_case(seed=3)
    omega[:, 1] = 0.0  # nobody contrasts with class 1 (and class 1 is not in the batch: labels 0, 2, 2)
    loss, groups = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None,
                                        return_logits=True, form=form)
    class1 = set(range(int(memory.class_offsets[1]), int(memory.class_offsets[2])))
    assert all(not (set(g["columns"].tolist()) & class1) for g in groups)
    memory.vertices[sorted(class1)] = F.normalize(torch.randn(len(class1), 4, dtype=torch.float64), dim=-1)
    changed = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None, form=form)
    assert torch.equal(loss, changed)  # bitwise: the class's rows never enter
    expected = naive_loss(memory, features, keypoints, visible, labels, omega, all_rows(memory), form=form)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_zero_omega_row_leaves_only_eq2():
    """A class with no kept other class has L_cross = -log 1 = 0: the loss is Eq. 2 alone."""
    memory, features, keypoints, visible, labels, _ = make_case(seed=3)
    only_in = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=torch.zeros(3, 3).double())
    expected = naive_loss(memory, features, keypoints, visible, labels, torch.zeros(3, 3), all_rows(memory))
    torch.testing.assert_close(only_in, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["paper", "novum"])
def test_gradcheck_float64(form):
    memory, features, keypoints, visible, labels, omega = make_case(seed=4)
    features.requires_grad_(True)

    def loss_of(f):
        return grouped_vmf_contrast(f, keypoints, visible, labels, memory, omega=omega, num_sampled=2, form=form,
                                    generator=torch.Generator().manual_seed(0), check=False)

    assert torch.autograd.gradcheck(loss_of, (features,), eps=1e-6, atol=1e-7)


def test_images_without_visible_vertices_are_a_no_op():
    memory, features, keypoints, visible, labels, omega = make_case(seed=5)
    visible[1] = 0.0
    with_empty = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None)
    keep = torch.tensor([0, 2])
    without = grouped_vmf_contrast(features[keep], keypoints[keep], visible[keep], labels[keep], memory, omega=omega,
                                   num_sampled=None)
    torch.testing.assert_close(with_empty, without, rtol=0, atol=1e-14)
    features.requires_grad_(True)
    empty = grouped_vmf_contrast(features, keypoints, torch.zeros_like(visible), labels, memory)
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


def test_bad_inputs_raise():
    memory, features, keypoints, visible, labels, omega = make_case(seed=6)
    call = lambda **kw: grouped_vmf_contrast(**{**dict(vertex_features=features, keypoints=keypoints, visible=visible,
                                                       labels=labels, memory=memory), **kw})
    with pytest.raises(ValueError, match="labels"):
        call(labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="omega"):
        call(omega=torch.ones(2, 2))
    with pytest.raises(ValueError, match="omega"):
        call(omega=-omega)
    with pytest.raises(ValueError, match="unit"):
        call(vertex_features=features * 2)
    with pytest.raises(ValueError, match="keypoints"):
        call(keypoints=keypoints[:, :2])
    with pytest.raises(ValueError, match="slots"):
        call(vertex_features=features[:, :3], keypoints=keypoints[:, :3], visible=visible[:, :3])
    with pytest.raises(ValueError, match="cross_class_scale"):
        call(cross_class_scale="k")


def test_memory_update_matches_loops_and_fifo_wraps():
    memory, features, _, visible, labels, _ = make_case(seed=7, num_background=5)
    before_vertices, before_background = memory.vertices.clone(), memory.background.clone()
    background = F.normalize(torch.randn(3, 1, 4, dtype=torch.float64), dim=-1)  # T = 1, 3 rows per step
    memory.update(features, visible, labels, background)
    expected = before_vertices.clone()
    for c in range(memory.num_classes):
        images = [b for b in range(3) if int(labels[b]) == c]
        if not images:
            continue
        for k in range(memory.num_vertices[c]):
            mean = sum(visible[b, k] * features[b, k] for b in images) / len(images)
            row = int(memory.class_offsets[c]) + k
            expected[row] = F.normalize(0.9 * before_vertices[row] + 0.1 * mean, dim=0)
    torch.testing.assert_close(memory.vertices, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(memory.background[:3], background.reshape(3, 4), rtol=0, atol=1e-15)
    assert torch.equal(memory.background[3:], before_background[3:]) and int(memory.pointer) == 3
    memory.update(features, visible, labels, background.flip(0))  # 3 + 3 > 5 rows: restart at row 0
    torch.testing.assert_close(memory.background[:3], background.flip(0).reshape(3, 4), rtol=0, atol=1e-15)
    assert int(memory.pointer) == 3


def test_confusion_weights():
    confusion = torch.tensor([[90.0, 8.0, 2.0], [0.0, 10.0, 0.0], [0.0, 0.0, 0.0]])
    omega = confusion_weights(confusion, threshold=0.05)
    torch.testing.assert_close(omega, torch.tensor([[0.0, 0.08, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    counts = torch.tensor([[80.0, 12.0, 6.0, 2.0], [0.0, 10.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    rates = counts / counts.sum(1, keepdim=True)
    kept = (rates >= 0.05) & ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(confusion_weights(counts, normalize="binary"), kept.float())
    mean = confusion_weights(counts, normalize="mean")  # kept entries of every row with any average 1
    torch.testing.assert_close(mean.sum(1) / kept.sum(1).clamp_min(1), (kept.sum(1) > 0).float())
    torch.testing.assert_close(mean[0, 1] / mean[0, 2], rates[0, 1] / rates[0, 2])
    with pytest.raises(ValueError):
        confusion_weights(-confusion)
    # symmetric: a pair is kept when either class is confused with the other; rates of the two rows
    counts = torch.tensor([[18.0, 2.0, 0.0], [0.0, 20.0, 0.0], [1.0, 0.0, 19.0]])
    rates = counts / counts.sum(1, keepdim=True)
    expected = torch.zeros(3, 3)
    for y in range(3):
        for z in range(3):
            rate = max(float(rates[y, z]), float(rates[z, y]))
            expected[y, z] = rate if y != z and rate >= 0.05 else 0.0
    torch.testing.assert_close(confusion_weights(counts, threshold=0.05, symmetric=True), expected)


def test_pairwise_confusion_matches_loops():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (30, 3), generator=g).double()  # ties count as outranking
    labels = torch.randint(0, 3, (30,), generator=g)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for n in range(30):
        for z in range(3):
            if z != int(labels[n]) and scores[n, z] >= scores[n, labels[n]]:
                expected[labels[n], z] += 1
    counts = pairwise_confusion(scores, labels, 3)
    torch.testing.assert_close(counts, expected)
    per_class = torch.bincount(labels, minlength=3)
    omega = confusion_weights(counts, threshold=0.05, images_per_class=per_class)
    rates = expected / per_class[:, None].double()
    torch.testing.assert_close(omega, torch.where(rates >= 0.05, rates, torch.zeros_like(rates)))
    # a class that wins on every image hides the others in the argmax confusion, not in the pairwise one
    sink = torch.tensor([[5.0, 1.0, 2.0], [5.0, 1.0, 3.0], [5.0, 4.0, 3.0]])
    assert pairwise_confusion(sink, torch.tensor([1, 1, 2]), 3).tolist() == [[0, 0, 0], [2, 0, 2], [1, 1, 0]]


def test_background_repulsion_equals_dense_mean():
    g = torch.Generator().manual_seed(0)
    background, rows = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    dense = 0.1 * torch.einsum("bnd,jd->bnj", background, rows).mean()
    torch.testing.assert_close(background_repulsion(background, rows), dense, rtol=0, atol=1e-15)


def test_classification_scores_match_loops():
    g = torch.Generator().manual_seed(0)
    memory = VertexMemory([3, 2, 4], dim=5, num_background=2, generator=g).double()
    feature_map = F.normalize(torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64), dim=1)
    owner = memory.vertex_class.clone()
    owner[4] = -1  # a row that competes but belongs to no class (NOVUM padding)
    compnet = classification_scores(feature_map, memory.vertices, owner, 3, memory.background, chunk=4)
    novum = classification_scores(feature_map, memory.vertices, owner, 3, rule="novum", normalizer=12.0, chunk=4)
    for b in range(2):
        for y in range(3):
            s_compnet, s_novum = 0.0, 0.0
            for i in range(3):
                for j in range(2):
                    f = feature_map[b, :, i, j]
                    own = max(float(f @ memory.vertices[r]) for r in range(9) if int(owner[r]) == y)
                    s_compnet += max(own, max(float(f @ beta) for beta in memory.background))  # Eq. 7
                    similarity = [float(f @ memory.vertices[r]) / 2 + 0.5 for r in range(9)]
                    best = max(range(9), key=lambda r: similarity[r])
                    s_novum += similarity[best] / 12.0 if int(owner[best]) == y else 0.0
            assert abs(float(compnet[b, y]) - s_compnet) < 1e-12 and abs(float(novum[b, y]) - s_novum) < 1e-12


def test_cell_class_scores_match_loops_and_reject_mismatched_rows():
    g = torch.Generator().manual_seed(1)
    memory = VertexMemory([2, 3, 1], dim=4, num_background=3, generator=g).double()
    features = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    owner = memory.vertex_class.clone()
    owner[5] = -1  # the only row of class 2 belongs to no class: class 2 gets -2
    class_max, background_max = cell_class_scores(features, memory.vertices, owner, 3, memory.background)
    for p in range(5):
        f = features[p]
        for y in range(3):
            rows = [float(f @ memory.vertices[r]) for r in range(6) if int(owner[r]) == y]
            assert abs(float(class_max[p, y]) - (max(rows) if rows else -2.0)) < 1e-12
        assert abs(float(background_max[p]) - max(float(f @ b) for b in memory.background)) < 1e-12
    assert cell_class_scores(features, memory.vertices, owner, 3)[1] is None
    with pytest.raises(ValueError, match="share D"):
        cell_class_scores(features[:, :3], memory.vertices, owner, 3)
    with pytest.raises(ValueError, match="vertex_class"):
        cell_class_scores(features, memory.vertices, owner[:4], 3)


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss():
    memory, features, keypoints, visible, labels, omega = make_case(seed=8)
    compiled = torch.compile(grouped_vmf_contrast)
    for num_sampled in (None, 2):
        eager = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=num_sampled,
                                     generator=torch.Generator().manual_seed(0))
        again = compiled(features, keypoints, visible, labels, memory, omega=omega, num_sampled=num_sampled,
                         generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(again, eager, rtol=1e-12, atol=1e-12)


def test_empty_batch_is_a_zero_loss():
    memory, features, keypoints, visible, labels, _ = make_case(seed=9)
    loss = grouped_vmf_contrast(features[:0], keypoints[:0], visible[:0], labels[:0], memory)
    assert float(loss) == 0.0


def test_nan_in_invisible_or_padded_slots_does_not_reach_the_loss():
    memory, features, keypoints, visible, labels, omega = make_case(seed=10)
    clean = grouped_vmf_contrast(features, keypoints, visible, labels, memory, omega=omega, num_sampled=None)
    poisoned = features.clone()
    poisoned[visible <= 0] = float("nan")  # invisible slots
    poisoned[:, -1] = float("nan")  # the padded slot (K_max = max K + 1)
    poisoned_keypoints = keypoints.clone()
    poisoned_keypoints[:, -1] = float("nan")
    poisoned.requires_grad_(True)
    loss = grouped_vmf_contrast(poisoned, poisoned_keypoints, visible, labels, memory, omega=omega, num_sampled=None)
    torch.testing.assert_close(loss, clean, rtol=0, atol=1e-14)
    loss.backward()
    assert torch.isfinite(poisoned.grad).all() and float(poisoned.grad[visible <= 0].abs().max()) == 0.0


def test_memory_update_never_absorbs_non_finite_features():
    memory, features, _, visible, labels, _ = make_case(seed=11)
    reference = VertexMemory(SIZES, dim=4, num_background=3, vertices=memory.vertices, background=memory.background)
    reference = reference.double()
    poisoned = features.clone()
    poisoned[0, 0] = float("nan")  # treated as invisible
    skipped = visible.clone()
    skipped[0, 0] = 0.0
    background = F.normalize(torch.randn(3, 1, 4, dtype=torch.float64), dim=-1)
    bad_background = background.clone()
    bad_background[1] = float("inf")  # leaves its FIFO row unchanged
    before = memory.background.clone()
    memory.update(poisoned, visible, labels, bad_background)
    reference.update(features, skipped, labels, background)
    assert torch.isfinite(memory.vertices).all() and torch.isfinite(memory.background).all()
    torch.testing.assert_close(memory.vertices, reference.vertices, rtol=0, atol=1e-15)
    torch.testing.assert_close(memory.background[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(memory.background[[0, 2]], reference.background[[0, 2]], rtol=0, atol=1e-15)


def test_memory_state_dict_keeps_the_fifo_pointer():
    memory, features, _, visible, labels, _ = make_case(seed=12)
    memory.update(features, visible, labels, F.normalize(torch.randn(3, 1, 4, dtype=torch.float64), dim=-1))
    copy = VertexMemory(SIZES, dim=4, num_background=3).double()
    copy.load_state_dict(memory.state_dict())
    assert copy.pointer == memory.pointer == 0 and torch.equal(copy.background, memory.background)


def test_confusion_weights_normalisations():
    confusion = torch.tensor([[80.0, 15.0, 5.0], [0.0, 10.0, 0.0], [1.0, 0.0, 99.0]])
    rates = confusion_weights(confusion, threshold=0.05)
    torch.testing.assert_close(rates, torch.tensor([[0.0, 0.15, 0.05], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    mean = confusion_weights(confusion, threshold=0.05, normalize="mean")
    torch.testing.assert_close(mean, torch.tensor([[0.0, 1.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    top = confusion_weights(confusion, threshold=0.05, normalize="max")
    torch.testing.assert_close(top, torch.tensor([[0.0, 1.0, 1 / 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="normalize"):
        confusion_weights(confusion, normalize="sum")
