"""Weighted k-NN classification on L2-normalised features (DINO's protocol)."""
import torch


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int, T: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, num_classes): the k most cosine-similar training samples vote exp(sim / T)."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.T
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / T).exp())
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07,
                 num_classes: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent. Features must already be L2-normalised."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_labels, test_labels = train_labels.long(), test_labels.long()
    scores = knn_predict(train_features, train_labels, test_features, k, T, num_classes)
    ranked = scores.sort(dim=1, descending=True).indices
    correct = ranked.eq(test_labels.view(-1, 1))
    n = test_labels.shape[0]
    top1 = correct[:, :1].sum().item() * 100.0 / n
    top5 = correct[:, :min(5, k, num_classes)].sum().item() * 100.0 / n
    return top1, top5
