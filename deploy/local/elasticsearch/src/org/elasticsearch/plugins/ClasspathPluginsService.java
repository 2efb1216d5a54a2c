/*
 * envoygeo local Elasticsearch: plugin service for plugins that sit on the JVM classpath.
 *
 * Why this exists: the regular PluginsService expects a distribution layout
 * (modules/<name>/ directories, each loaded into its own module layer). We only
 * have the jars Elasticsearch publishes to Maven Central, all on one flat
 * classpath, so - like the test framework's MockPluginsService - we instantiate
 * the plugin classes directly. It has to live in this package because
 * LoadedPlugin and loadPlugin() are package-private.
 */
package org.elasticsearch.plugins;

import org.elasticsearch.Build;
import org.elasticsearch.action.admin.cluster.node.info.PluginsAndModules;
import org.elasticsearch.env.Environment;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;

public class ClasspathPluginsService extends PluginsService {

    private final List<LoadedPlugin> loaded;

    public ClasspathPluginsService(Environment env, Map<String, Class<? extends Plugin>> pluginClasses) {
        // An empty loader: nothing is read from path.home/modules or path.home/plugins.
        super(env.settings(), env.configDir(), PluginsLoader.createPluginsLoader(Set.of(), Set.of(), Map.of(), false));
        List<LoadedPlugin> list = new ArrayList<>();
        for (Map.Entry<String, Class<? extends Plugin>> entry : pluginClasses.entrySet()) {
            Class<? extends Plugin> cls = entry.getValue();
            Plugin instance = loadPlugin(cls, env.settings(), env.configDir());
            // Report the plugin under its distribution module name (e.g. "transport-netty4") in
            // nodes info, so the node looks like a stock one to clients that inspect modules.
            PluginDescriptor descriptor = new PluginDescriptor(
                entry.getKey(),
                "loaded from the classpath by the envoygeo launcher",
                Build.current().version(),
                Build.current().version(),
                Integer.toString(Runtime.version().feature()),
                cls.getName(),
                null,
                List.of(),
                false,
                false,
                false,
                false,
                PluginDescriptor.DeploymentTarget.ALL
            );
            list.add(new LoadedPlugin(descriptor, instance, cls.getClassLoader()));
        }
        this.loaded = List.copyOf(list);
    }


    @Override
    protected List<LoadedPlugin> plugins() {
        return loaded;
    }

    @Override
    public PluginsAndModules info() {
        // They are modules in a real distribution, so list them as modules rather than plugins.
        return new PluginsAndModules(List.of(), loaded.stream().map(LoadedPlugin::descriptor).toList());
    }
}
