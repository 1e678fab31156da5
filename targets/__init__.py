"""stars_deploy.targets: simulated hardware back-ends behind one result record."""
