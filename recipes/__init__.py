"""Built-in recipes (YAML). Installed as the package ``retrofit.recipes`` so they are found by name
from a wheel or an editable checkout alike; see ``retrofit.recipe.builtin_recipes``."""
