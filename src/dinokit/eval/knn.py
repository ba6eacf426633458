"""Weighted k-NN classification on L2-normalised features (DINO's protocol)."""
import torch


@torch.no_grad()
def knn_neighbours(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                   chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of each test sample's k nearest training samples, nearest first:
    two (N_test, k) tensors. Test samples go in chunks so that the similarity matrix stays small."""
    k = min(k, train_features.shape[0])
    n = test_features.shape[0]
    top_sim = test_features.new_empty(n, k)
    top_idx = torch.empty(n, k, dtype=torch.long, device=test_features.device)
    sim = test_features.new_empty(min(chunk, n), train_features.shape[0])  # reused: no page faults per chunk
    for start in range(0, n, chunk):
        q = test_features[start:start + chunk]
        s = torch.mm(q, train_features.T, out=sim[:q.shape[0]])
        torch.topk(s, k, dim=1, largest=True, sorted=True,
                   out=(top_sim[start:start + q.shape[0]], top_idx[start:start + q.shape[0]]))
    return top_sim, top_idx


def knn_vote(top_sim: torch.Tensor, top_idx: torch.Tensor, train_labels: torch.Tensor, T: float,
             num_classes: int) -> torch.Tensor:
    """Class scores (N_test, num_classes): every neighbour votes for its class with weight exp(sim / T)."""
    votes = torch.zeros(top_sim.shape[0], num_classes, dtype=top_sim.dtype, device=top_sim.device)
    return votes.scatter_add_(1, train_labels[top_idx], (top_sim / T).exp())


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int, T: float, num_classes: int, chunk: int = 512) -> torch.Tensor:
    """Class scores (N_test, num_classes): the k most cosine-similar training samples vote exp(sim / T)."""
    top_sim, top_idx = knn_neighbours(train_features, test_features, k, chunk)
    return knn_vote(top_sim, top_idx, train_labels.long(), T, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of class scores; top-5 counts at most k classes, as the reference."""
    ranked = scores.sort(dim=1, descending=True).indices
    correct = ranked.eq(labels.view(-1, 1).to(ranked.device))
    n = labels.shape[0]
    top1 = correct[:, :1].sum().item() * 100.0 / n
    top5 = correct[:, :min(5, k, scores.shape[1])].sum().item() * 100.0 / n
    return top1, top5


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07,
                 num_classes: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent. Features must already be L2-normalised."""
    return knn_evaluate(train_features, train_labels, test_features, test_labels, [k], T, num_classes)[k]


@torch.no_grad()
def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks=(10, 20, 100, 200), T: float = 0.07,
                 num_classes: int | None = None) -> dict[int, tuple[float, float]]:
    """{k: (top-1, top-5)} for several k from one neighbour search (the largest k's, sorted)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_labels, test_labels = train_labels.long(), test_labels.long()
    top_sim, top_idx = knn_neighbours(train_features, test_features, max(ks))
    results = {}
    for k in ks:
        k_eff = min(k, top_sim.shape[1])
        scores = knn_vote(top_sim[:, :k_eff], top_idx[:, :k_eff], train_labels, T, num_classes)
        results[k] = topk_accuracy(scores, test_labels, k_eff)
    return results
