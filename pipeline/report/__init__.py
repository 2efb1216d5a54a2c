"""`envoygeo report`: one self-contained HTML page from Elasticsearch aggregations.

For people without Kibana, and for demos on machines without network: the page has no
scripts, fonts, tiles or CDN links; the world map is inline SVG projected in Python
from country shapes shipped in `world.json`.
"""
