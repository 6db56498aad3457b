"Sphinx configuration: the docs site, rendered from the notebooks' saved outputs (see docs/build.sh)."
import bigmodel_nb

project = "bigmodel_nb"
author = "bigmodel_nb developers"
copyright = "2026, bigmodel_nb developers"
release = version = bigmodel_nb.__version__

extensions = ["myst_nb", "sphinx.ext.mathjax"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# Render what the notebooks saved; never execute while building the docs.
nb_execution_mode = "off"
nb_render_markdown_format = "myst"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type", "misc.highlighting_failure", "myst.header"]

# MathJax is bundled locally (docs/build.sh copies the npm package `mathjax@3` into _static/mathjax),
# so the site loads nothing from outside.
mathjax_path = "mathjax/tex-chtml.js"

html_theme = "sphinx_book_theme"
html_title = "bigmodel_nb"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
}
html_show_sourcelink = False
