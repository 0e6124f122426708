"""The one exception type for a bad MoE configuration, so entry points can report it in one line."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the fix."""


def check_num_experts(num_experts: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool):
        raise ConfigError(f"experts={num_experts!r} must be a whole number of experts, e.g. experts=8")
    if num_experts < 1:
        raise ConfigError(f"experts={num_experts}: a MoE layer needs at least 1 expert, set experts>=1")
