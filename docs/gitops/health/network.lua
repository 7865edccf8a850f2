-- Argo CD health of network.stratus.io/Network (resource.customizations.health.network.stratus.io_Network).
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to allocate the network"
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and (st.observedGeneration == nil or st.observedGeneration < gen) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(gen)
  return hs
end
local ready = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end
if st.status == "ERROR" then
  hs.status = "Degraded"
  hs.message = (ready and ready.message) or "the network is in ERROR"
  return hs
end
if st.status == "BUILD" then
  hs.status = "Progressing"
  hs.message = (ready and ready.message) or "BUILD"
  return hs
end
if st.status == "DOWN" then
  hs.status = "Suspended"
  hs.message = "Administratively down (spec.adminStateUp: false)"
  return hs
end
hs.status = "Healthy"
hs.message = st.status
if ready ~= nil and ready.message ~= nil then
  hs.message = st.status .. ": " .. ready.message
end
return hs
