"""The status page's files (HTML, JS, CSS), served by ``fedprune.aggregator.status_page``."""
