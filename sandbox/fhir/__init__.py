"""The sandbox's FHIR R4 surface: rendering canonical records as Redox's FHIR API returns them
(``render``), the HTTP routes (``routes``), search and paging (``search``, ``paging``), write-back
operations (``operations``, ``writeback``), identifier systems (``identifiers``) and the
``--seed-from`` loader that turns FHIR files back into records (``seed_from``)."""
