"""The 19 Kaggle-2021 HPA single-cell classes: one catalogue for the whole package.

Everything that names, colours or describes a class reads it from here, so the
GUI, the CSV exports, the synthetic generator and the models agree.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HPAClass",
    "CLASSES",
    "N_CLASSES",
    "NEGATIVE",
    "CLASS_NAMES",
    "SHORT_NAMES",
    "class_by_name",
    "CHANNELS",
    "CHANNEL_COLORMAPS",
]


@dataclass(frozen=True)
class HPAClass:
    """One localisation class.

    Attributes
    ----------
    index : int
        Kaggle 2021 class id (0..18).
    name : str
        Full name as used by the HPA / Kaggle.
    short : str
        Short, column-safe name (used in CSV headers and layer names).
    color : str
        Hex RGB colour used for overlays and plots.
    description : str
        One sentence on what the pattern looks like in the green channel.
    compartment : str
        ``"nucleus"``, ``"cytoplasm"``, ``"membrane"`` or ``"none"``; coarse place of the
        pattern, used by the synthetic generator and by docs.
    """

    index: int
    name: str
    short: str
    color: str
    description: str
    compartment: str


# Colours: a qualitative palette (Tableau-20-like) so neighbouring ids differ.
CLASSES: tuple[HPAClass, ...] = (
    HPAClass(0, "Nucleoplasm", "nucleoplasm", "#1f77b4",
             "Diffuse signal filling the nucleus except the nucleoli.", "nucleus"),
    HPAClass(1, "Nuclear membrane", "nuclear_membrane", "#aec7e8",
             "Thin ring outlining the nucleus.", "nucleus"),
    HPAClass(2, "Nucleoli", "nucleoli", "#ff7f0e",
             "A few large round bodies inside the nucleus.", "nucleus"),
    HPAClass(3, "Nucleoli fibrillar center", "nucleoli_fc", "#ffbb78",
             "Small dots clustered inside the nucleoli.", "nucleus"),
    HPAClass(4, "Nuclear speckles", "nuclear_speckles", "#2ca02c",
             "Many irregular speckles spread through the nucleoplasm.", "nucleus"),
    HPAClass(5, "Nuclear bodies", "nuclear_bodies", "#98df8a",
             "A handful of small bright dots in the nucleus.", "nucleus"),
    HPAClass(6, "Endoplasmic reticulum", "er", "#d62728",
             "Reticular network through the cytoplasm, dense near the nucleus.", "cytoplasm"),
    HPAClass(7, "Golgi apparatus", "golgi", "#ff9896",
             "Compact perinuclear ribbon on one side of the nucleus.", "cytoplasm"),
    HPAClass(8, "Intermediate filaments", "intermediate_filaments", "#9467bd",
             "Long wavy filaments, often perinuclear cage-like.", "cytoplasm"),
    HPAClass(9, "Actin filaments", "actin_filaments", "#c5b0d5",
             "Straight stress fibres and a bright cell cortex.", "cytoplasm"),
    HPAClass(10, "Microtubules", "microtubules", "#8c564b",
              "Radial filaments from the centrosome, like the red channel.", "cytoplasm"),
    HPAClass(11, "Mitotic spindle", "mitotic_spindle", "#c49c94",
              "Bipolar spindle in dividing cells only.", "cytoplasm"),
    HPAClass(12, "Centrosome", "centrosome", "#e377c2",
              "One or two bright dots next to the nucleus.", "cytoplasm"),
    HPAClass(13, "Plasma membrane", "plasma_membrane", "#f7b6d2",
              "Signal along the cell outline.", "membrane"),
    HPAClass(14, "Mitochondria", "mitochondria", "#7f7f7f",
              "Short worm-like tubules throughout the cytoplasm.", "cytoplasm"),
    HPAClass(15, "Aggresome", "aggresome", "#c7c7c7",
              "One large bright perinuclear blob.", "cytoplasm"),
    HPAClass(16, "Cytosol", "cytosol", "#bcbd22",
              "Diffuse signal filling the cytoplasm.", "cytoplasm"),
    HPAClass(17, "Vesicles and punctate cytosolic patterns", "vesicles", "#dbdb8d",
              "Many small dots scattered through the cytoplasm.", "cytoplasm"),
    HPAClass(18, "Negative", "negative", "#17becf",
              "No specific staining above background.", "none"),
)

N_CLASSES: int = len(CLASSES)
NEGATIVE: int = 18
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
SHORT_NAMES: tuple[str, ...] = tuple(c.short for c in CLASSES)

#: Fixed channel order of every (4, Y, X) image in this package.
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
#: What each channel stains.
CHANNEL_STAINS: dict[str, str] = {
    "red": "microtubules",
    "green": "protein of interest",
    "blue": "nucleus",
    "yellow": "endoplasmic reticulum",
}
#: napari colormap name for each channel.
CHANNEL_COLORMAPS: dict[str, str] = {
    "red": "red",
    "green": "green",
    "blue": "blue",
    "yellow": "yellow",
}


def class_by_name(name: str) -> HPAClass:
    """Look a class up by full name, short name or id (as a string), case-insensitively."""
    key = name.strip().lower()
    for c in CLASSES:
        if key in (c.name.lower(), c.short, str(c.index)):
            return c
    raise KeyError(f"unknown HPA class {name!r}; known: {', '.join(SHORT_NAMES)}")
