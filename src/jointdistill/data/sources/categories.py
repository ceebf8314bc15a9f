"""The Cityscapes 7 categories and their official colours: the classes of the `cityscapes` source at 7 classes and
of the embedded synthetic street scenes, which are labelled like Cityscapes."""

CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CATEGORY_PALETTE = (
    (128, 64, 128),
    (70, 70, 70),
    (153, 153, 153),
    (107, 142, 35),
    (70, 130, 180),
    (220, 20, 60),
    (0, 0, 142),
)
