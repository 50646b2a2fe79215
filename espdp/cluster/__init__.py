"""Active-active cluster: N gateways share one address (docs/cluster.md).

* :mod:`.hash`: the segment of a peer, Linux xt_cluster's hash;
* :mod:`.filter`: the dataplane's per-batch hook (own segments, armed SAs,
  the fence, the budget);
* :mod:`.node`: the daemon loop's side (SA -> segment, arming, checkpoints,
  status);
* :mod:`.agent`: the thread that talks to etcd (lease, claims, checkpoints,
  replication), over :mod:`.store`;
* :mod:`.balance`: who claims or gives up which segment;
* :mod:`.replicate`: control-socket changes to every node, sealed by :mod:`.seal`;
* :mod:`.config`: the ``[cluster]`` table.
"""
