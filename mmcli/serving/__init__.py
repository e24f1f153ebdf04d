"""``mmcli serve``: search indexes over HTTP (:mod:`~mmcli.serving.service`, :mod:`~mmcli.serving.app`)
and in a browser (``page.html``)."""
