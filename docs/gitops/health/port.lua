-- Argo CD health of network.stratus.io/Port (resource.customizations.health.network.stratus.io_Port).
-- The operator allocates MAC and addresses (condition Ready); the node agent wires the port (condition Bound).
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to allocate the port"
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and (st.observedGeneration == nil or st.observedGeneration < gen) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(gen)
  return hs
end
local ready, bound = nil, nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Bound" then
      bound = c
    end
  end
end
if st.status == "ERROR" then
  hs.status = "Degraded"
  hs.message = (ready and ready.message) or "the port is in ERROR"
  return hs
end
if st.status == "ACTIVE" then
  hs.status = "Healthy"
  hs.message = "Wired on " .. tostring(st.bindingHost)
  return hs
end
if st.status == "DOWN" and ready ~= nil and ready.status == "True" then
  -- Allocated and used by no server on any node: what a port nobody boots with is.
  hs.status = "Healthy"
  hs.message = "Allocated, not bound to a hypervisor"
  return hs
end
hs.status = "Progressing"
hs.message = st.status
local why = bound or ready
if why ~= nil and why.message ~= nil then
  hs.message = st.status .. ": " .. why.message
end
return hs
