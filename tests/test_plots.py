"""The shared figures draw what they are given and refuse what they cannot draw (Agg backend, no window)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    plt.close("all")
    yield
    plt.close("all")


def last_figure():
    return plt.figure(plt.get_fignums()[-1])


def test_levels_over_histogram_draws_one_panel_per_table_with_its_levels():
    values = torch.linspace(-1, 1, 257)
    plots.levels_over_histogram(values.numpy(), {"A": torch.tensor([-1.0, 0.0, 1.0]), "B": torch.tensor([0.5])},
                                title_format="{name} levels", xlabel="x")
    axes = last_figure().axes
    assert [ax.get_title() for ax in axes] == ["A levels", "B levels"]
    assert [len(ax.collections[0].get_segments()) for ax in axes] == [3, 1]


def test_labelled_scatter_labels_every_point():
    plots.labelled_scatter({"NF4": (4.5, 0.004), "2-bit": (2.5, 0.13)}, title="t", xlabel="bits", ylabel="KL",
                           log_x=True, log_y=True)
    ax = last_figure().axes[0]
    assert sorted(text.get_text() for text in ax.texts) == ["2-bit", "NF4"]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"


def test_per_layer_errors_shows_the_difference_as_numbers():
    errors = {"NF4": [0.10, 0.20], "NF4 + DQ": [0.101, 0.20], "FP4": [0.13, 0.26]}
    plots.per_layer_errors(errors, difference=("NF4", "NF4 + DQ"), title="t")
    left, right = last_figure().axes
    assert len(left.patches) == 6
    assert [text.get_text() for text in right.texts] == ["+1.00%", "+0.00%"]


def test_bad_input_says_what_was_wrong():
    with pytest.raises(ValueError, match="at least one table"):
        plots.levels_over_histogram([0.1], {}, title_format="{name}", xlabel="x")
    with pytest.raises(ValueError, match="at least one value"):
        plots.levels_over_histogram([], {"A": [0.0]}, title_format="{name}", xlabel="x")
    with pytest.raises(ValueError, match="at least one point"):
        plots.labelled_scatter({}, title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="log axis"):
        plots.labelled_scatter({"float32": (32, 0.0)}, title="t", xlabel="x", ylabel="y", log_y=True)
    with pytest.raises(ValueError, match="one error per layer"):
        plots.per_layer_errors({"a": [0.1], "b": [0.1, 0.2]}, difference=("a", "b"), title="t")
    with pytest.raises(ValueError, match="not in errors"):
        plots.per_layer_errors({"a": [0.1]}, difference=("a", "c"), title="t")
    with pytest.raises(ValueError, match="at least one"):
        plots.per_layer_errors({}, difference=("a", "b"), title="t")


def test_llm_int8_decomposition_draws_the_features_and_the_split_with_its_shapes():
    before = [1.0, 2.0, 1.5, 0.5]
    after = [1.0, 2.0, 48.0, 0.5]
    plots.llm_int8_decomposition(before, after, threshold=6.0, float_columns=[2], tokens=64, out_features=16,
                                 float_dtype="float32", title="t")
    left, right = last_figure().axes
    assert [line.get_ydata()[2] for line in left.lines[:2]] == [1.5, 48.0]
    assert left.texts[0].get_text() == "feature 2: 48"
    labels = [text.get_text() for text in right.texts]
    assert "X, other columns\n64 x 3" in labels and "W.T, other rows\n3 x 16" in labels
    assert "X[:, 2]\n64 x 1" in labels and "W.T[2]\n1 x 16" in labels and "Y\n64 x 16" in labels
    with pytest.raises(ValueError, match="at least one of the 4 features"):
        plots.llm_int8_decomposition(before, after, 6.0, [], 64, 16, "float32", "t")
    with pytest.raises(ValueError, match="the same number"):
        plots.llm_int8_decomposition(before, after[:3], 6.0, [2], 64, 16, "float32", "t")


def test_quantization_number_lines_draw_every_level_and_an_arrow_per_value():
    levels = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    values = torch.tensor([-0.8, 0.4, 1.9])
    plots.quantization_number_lines({"a": (levels, values, torch.tensor([-1.0, 0.0, 2.0])),
                                     "b": (levels[:2], values, torch.tensor([-1.0, 0.0, 0.0]))}, title="t", xlabel="x")
    axes = last_figure().axes
    assert [ax.get_title(loc="left") for ax in axes] == ["a", "b"]
    assert len(axes[0].collections) == 4 and len(axes[1].collections) == 2  # one tick per level
    assert len(axes[0].texts) == 3  # one arrow per value


def test_error_heatmaps_share_one_colour_scale():
    plots.error_heatmaps({"x": torch.zeros(2, 3).numpy(), "y": torch.full((2, 3), 0.5).numpy()}, title="t",
                         colorbar_label="error", mark=(1, 2))
    figure = last_figure()
    images = [ax.images[0] for ax in figure.axes if ax.images]
    assert len(images) == 2 and {image.get_clim() for image in images} == {(0.0, 0.5)}


def test_bad_input_to_the_basics_figures():
    with pytest.raises(ValueError, match="at least one scheme"):
        plots.quantization_number_lines({}, title="t", xlabel="x")
    with pytest.raises(ValueError, match="one rounded value per value"):
        plots.quantization_number_lines({"a": ([0.0], [0.1, 0.2], [0.0])}, title="t", xlabel="x")
    with pytest.raises(ValueError, match="one shape"):
        plots.error_heatmaps({"a": torch.zeros(2, 2).numpy(), "b": torch.zeros(3, 2).numpy()}, title="t",
                             colorbar_label="e")
def test_lora_update_shapes_draws_the_three_matrices_to_scale():
    from matplotlib.patches import Rectangle

    plots.lora_update_shapes(out_features=128, in_features=256, r=8, scaling=2.0, title="q_proj")
    ax = last_figure().axes[0]
    boxes = {patch.get_label(): (patch.get_width(), patch.get_height()) for patch in ax.patches
             if isinstance(patch, Rectangle)}
    assert boxes == {"W": (256, 128), "B": (8, 128), "A": (256, 8)}  # (columns, rows) of each matrix
    texts = [text.get_text() for text in ax.texts]
    assert "W\n128 x 256\n32,768 values" in texts and "B = lora_B\n128 x 8\n1,024 values" in texts
    assert "+  2 x" in texts


def test_lora_update_shapes_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        plots.lora_update_shapes(64, 64, 0, 1.0, title="t")
    with pytest.raises(ValueError, match="larger than the layer allows"):
        plots.lora_update_shapes(64, 16, 32, 1.0, title="t")
