"""The localisation lab: many viewers behind two access routers, two OTT servers, a fault on one
component, and the QoS service naming it (docs/lab.md, "The localisation lab")."""
