"""Models whose velocity fields are known in closed form, for the benchmarks' tests: where both branches
are exact, the learned Δv is the exact one, so a benchmark's estimate of it can be checked; a branch
made wrong on purpose must show up in it."""
import torch


class ExactForGaussianData(torch.nn.Module):
    """The exact velocity of data x ~ N(0, I): E[x | x_τ] = (1 − τ)/((1 − τ)² + τ²)·x_τ, for both signs
    of t (its one-step samples are distributed as the data, so the fake field is the real one), and
    F(z, 1, 0) = 0, so that x̂ = z ~ N(0, I)."""

    def __init__(self, real_branch_scale=1.0):
        super().__init__()
        self.real_branch_scale = real_branch_scale

    def forward(self, x_t, t, tt):
        a = t.abs()[:, None]
        F = (1 - (1 - a) / ((1 - a) ** 2 + a**2)) * x_t / a
        F = torch.where((t > 0)[:, None], self.real_branch_scale * F, F)
        return torch.where(((a == 1) & (tt[:, None] == 0)), torch.zeros_like(F), F)


class ShiftedSamples(torch.nn.Module):
    """Data x ~ N(0, I) and one-step samples x̂ = z + shift ~ N(shift, I), with each branch exact: the
    real one for the data, the fake one for the samples. So the learned Δv is the exact one."""

    def __init__(self, shift=(1.0, 0.0)):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    @staticmethod
    def velocity(x_t, a, mean):
        """(x_a − E[x | x_a])/a for data N(mean, I), where
        E[x | x_a] = mean + (1 − a)/((1 − a)² + a²)·(x_a − (1 − a)·mean)."""
        return (x_t - mean - (1 - a) / ((1 - a) ** 2 + a**2) * (x_t - (1 - a) * mean)) / a

    def forward(self, x_t, t, tt):
        a = t.abs()[:, None]
        real, fake = self.velocity(x_t, a, torch.zeros_like(self.shift)), self.velocity(x_t, a, self.shift)
        F = torch.where((t > 0)[:, None], real, fake)
        return torch.where((a == 1) & (tt[:, None] == 0), -self.shift.expand_as(F), F)
